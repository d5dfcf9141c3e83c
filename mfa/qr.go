package mfa

import (
	"bufio"
	"image/color"
	"io"

	"github.com/boombuler/barcode/qr"
)

// QROptions change how WriteQRCode draws.
type QROptions struct {
	// Quiet is the margin in modules; 0 means 4, the minimum the QR
	// specification asks for (scanners need it to find the code).
	Quiet int
	// DarkOnLight draws dark modules as ink, for terminals with dark text on
	// a light background. The default draws light modules as ink, which is
	// right for the usual light-on-dark terminal.
	DarkOnLight bool
}

// WriteQRCode renders text as a QR code with opts: one module per character
// cell horizontally and two per cell vertically (Unicode half blocks).
func WriteQRCode(w io.Writer, text string, opts QROptions) error {
	code, err := qr.Encode(text, qr.M, qr.Auto)
	if err != nil {
		return err
	}
	quiet := opts.Quiet
	if quiet <= 0 {
		quiet = 4
	}
	n := code.Bounds().Dx()
	size := n + 2*quiet
	// ink reports whether the module at (x, y) of the padded grid is drawn
	// with the terminal's foreground. Rows past the bottom are background.
	ink := func(x, y int) bool {
		if y >= size {
			return false
		}
		dark := false
		if x >= quiet && x < quiet+n && y >= quiet && y < quiet+n {
			g := color.Gray16Model.Convert(code.At(x-quiet, y-quiet)).(color.Gray16)
			dark = g.Y < 0x8000
		}
		return dark == opts.DarkOnLight
	}
	bw := bufio.NewWriter(w)
	for y := 0; y < size; y += 2 {
		for x := 0; x < size; x++ {
			top, bottom := ink(x, y), ink(x, y+1)
			switch {
			case top && bottom:
				bw.WriteString("█")
			case top:
				bw.WriteString("▀")
			case bottom:
				bw.WriteString("▄")
			default:
				bw.WriteByte(' ')
			}
		}
		bw.WriteByte('\n')
	}
	return bw.Flush()
}
