package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// progress reports how far the run is, on stderr: a redrawn bar when
// stderr is a terminal, plain lines otherwise (CI logs, pipes).
type progress struct {
	w       io.Writer
	tty     bool
	total   int
	n       int
	label   string
	started time.Time
}

func newProgress(w io.Writer) *progress {
	p := &progress{w: w}
	if f, ok := w.(*os.File); ok {
		st, err := f.Stat()
		p.tty = err == nil && st.Mode()&os.ModeCharDevice != 0
	}
	return p
}

// log prints a message without breaking the bar.
func (p *progress) log(format string, args ...any) {
	if p.tty {
		fmt.Fprint(p.w, "\r\033[K")
	}
	fmt.Fprintf(p.w, "bench: "+format+"\n", args...)
	if p.tty && p.total > 0 {
		p.draw()
	}
}

func (p *progress) begin(total int) { p.total, p.started = total, time.Now() }

func (p *progress) start(label string) {
	p.label = label
	if p.tty {
		p.draw()
	}
}

func (p *progress) done(result string) {
	p.n++
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K  %s  %s\n", p.label, result)
		if p.n < p.total {
			p.draw()
		}
		return
	}
	fmt.Fprintf(p.w, "[%d/%d] %s  %s\n", p.n, p.total, p.label, result)
}

// finish clears the bar.
func (p *progress) finish() {
	if p.tty {
		fmt.Fprint(p.w, "\r\033[K")
	}
}

func (p *progress) draw() {
	const width = 30
	filled := 0
	if p.total > 0 {
		filled = p.n * width / p.total
	}
	eta := ""
	if p.n > 0 {
		left := time.Duration(float64(time.Since(p.started)) / float64(p.n) * float64(p.total-p.n))
		eta = " ~" + left.Round(time.Second).String() + " left"
	}
	fmt.Fprintf(p.w, "\r\033[K[%s%s] %d/%d%s  %s", strings.Repeat("#", filled), strings.Repeat(".", width-filled), p.n, p.total, eta, p.label)
}
