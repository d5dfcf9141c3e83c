package mfa

import (
	"bytes"
	"image/color"
	"strings"
	"testing"

	"github.com/boombuler/barcode/qr"
)

// parseQR turns half-block output back into a grid of ink flags.
func parseQR(t *testing.T, out string) [][]bool {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	var grid [][]bool
	for _, l := range lines {
		top, bottom := []bool{}, []bool{}
		for _, r := range l {
			switch r {
			case '█':
				top, bottom = append(top, true), append(bottom, true)
			case '▀':
				top, bottom = append(top, true), append(bottom, false)
			case '▄':
				top, bottom = append(top, false), append(bottom, true)
			case ' ':
				top, bottom = append(top, false), append(bottom, false)
			default:
				t.Fatalf("unexpected rune %q", r)
			}
		}
		grid = append(grid, top, bottom)
	}
	return grid
}

func TestWriteQR(t *testing.T) {
	const uri = "otpauth://totp/pgmfa:alice?algorithm=SHA1&digits=6&issuer=pgmfa&period=30&secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
	ref, err := qr.Encode(uri, qr.M, qr.Auto)
	if err != nil {
		t.Fatal(err)
	}
	n := ref.Bounds().Dx()
	for _, darkOnLight := range []bool{false, true} {
		var buf bytes.Buffer
		if err := WriteQRCode(&buf, uri, QROptions{DarkOnLight: darkOnLight}); err != nil {
			t.Fatal(err)
		}
		grid := parseQR(t, buf.String())
		size := n + 8
		// Odd sizes leave half a line of background at the bottom.
		if len(grid) != size+1 || len(grid[0]) != size {
			t.Fatalf("grid %dx%d, want %dx%d (+1 background row)", len(grid[0]), len(grid), size, size)
		}
		for _, row := range grid[size:] {
			for _, v := range row {
				if v {
					t.Fatal("ink below the code")
				}
			}
		}
		isDark := func(x, y int) bool { return grid[y][x] == darkOnLight }
		for y := 0; y < size; y++ {
			if len(grid[y]) != size {
				t.Fatalf("row %d has %d modules", y, len(grid[y]))
			}
			for x := 0; x < size; x++ {
				inCode := x >= 4 && x < 4+n && y >= 4 && y < 4+n
				if !inCode {
					if isDark(x, y) {
						t.Fatalf("quiet zone module (%d,%d) is dark", x, y)
					}
					continue
				}
				want := color.Gray16Model.Convert(ref.At(x-4, y-4)).(color.Gray16).Y < 0x8000
				if isDark(x, y) != want {
					t.Fatalf("module (%d,%d) differs from the encoder's", x-4, y-4)
				}
			}
		}
		// The finder pattern's outer ring at the top-left corner.
		for i := 0; i < 7; i++ {
			for _, p := range [][2]int{{i, 0}, {i, 6}, {0, i}, {6, i}} {
				if !isDark(4+p[0], 4+p[1]) {
					t.Fatalf("finder ring module %v is light", p)
				}
			}
		}
		if isDark(4+1, 4+1) {
			t.Fatal("finder gap module is dark")
		}
	}
}
