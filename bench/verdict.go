package main

import (
	"fmt"
	"io"
	"math"
)

// The targets pgmfa is held to (README, "Performance"),
// each judged on the product's default path, pgmfa-sockmap, unless it names
// another, at the end of every run.
//
// A verdict uses the figure's spread (spread.go): too noisy when the spread
// is wider than -spread (the figure is marked "?" in the table: on a busy
// machine a path can even seem faster than direct) or unknown (one round);
// otherwise met when the figure is on the right side of the target even
// after moving it by its spread against the target, not met when it is on
// the wrong side even after moving it by its spread towards the target,
// and too noisy when the target lies within the spread. So a run on a
// busy machine says "too noisy" instead of a verdict it cannot support.

// target is one line of the verdict.
type target struct {
	Workload string
	Name     string  // what the line says
	Kind     string  // "ratio" (x direct, at least), "delta" (ms vs direct, at most), "value" (at most)
	Bound    float64 // the target
	Path     string  // the path it is judged on; "": verdictPath
}

// path is the path t is judged on.
func (t target) path() string {
	if t.Path != "" {
		return t.Path
	}
	return verdictPath
}

var targets = []target{
	{"select-1", "pgbench -S, 1 client, at least 0.98 x direct", "ratio", 0.98, ""},
	{"select-16", "pgbench -S, 16 clients, at least 0.9 x direct", "ratio", 0.9, ""},
	{"select-64", "pgbench -S, 64 clients, at least 0.9 x direct", "ratio", 0.9, ""},
	{"copy-out", "COPY TO STDOUT, at least 0.95 x direct", "ratio", 0.95, ""},
	{"copy-in", "COPY FROM STDIN, at least 0.95 x direct", "ratio", 0.95, ""},
	{"connect", "logins/s with MFA (remembered), at least 0.95 x direct", "ratio", 0.95, ""},
	{"login-latency", "login latency with MFA, at most +0.5 ms over direct", "delta", 0.5, ""},
	{"login-latency-paced", "login latency with MFA, logins 50 ms apart, at most +0.5 ms over direct", "delta", 0.5, ""},
	// The fleet's store costs round trips on a login that is not
	// remembered in memory (the grant, the claim): a lower bar.
	{"connect", "logins/s with MFA in a PostgreSQL store, at least 0.85 x direct", "ratio", 0.85, pathPgstore},
	{"idle-rss", "proxy memory per idle spliced session, at most 4 KiB", "value", 4, ""},
	{"mfa-wait-rss", "proxy memory per login waiting for MFA, at most 16 KiB", "value", 16, ""},
}

// verdictPath is the path the targets are judged on.
const verdictPath = pathSockmap

// verdict judges one row against one target: "met", "not met" or "too
// noisy", and the figure it judged ("0.83 ±0.02").
func verdict(t target, r *Row, maxSpread float64) (string, string) {
	var v, s float64
	var format string
	atLeast := false
	switch t.Kind {
	case "ratio":
		v, s, format, atLeast = r.Ratio.Median, r.RatioSpread, "%.2f", true
		if r.Ratio.N == 0 {
			v = math.NaN()
		}
	case "delta":
		v, s, format = r.Delta.Median, r.DeltaSpread, "%+.2f ms"
		if r.Delta.N == 0 {
			v = math.NaN()
		}
	default:
		v, s, format = r.Value.Median, r.ValueSpread, "%.1f"
		if r.Value.N == 0 {
			v = math.NaN()
		}
	}
	if math.IsNaN(v) {
		return "no figure", "-"
	}
	fig := fmt.Sprintf(format, v) + " " + fmtSpread(s, "%.2f")
	if math.IsNaN(s) {
		return "too noisy (one round: no spread)", fig
	}
	if !r.settled(maxSpread) {
		return fmt.Sprintf("too noisy (spread above %.2f)", maxSpread), fig
	}
	lo, hi := v-s, v+s
	switch {
	case atLeast && lo >= t.Bound, !atLeast && hi <= t.Bound:
		return "met", fig
	case atLeast && hi < t.Bound, !atLeast && lo > t.Bound:
		return "not met", fig
	}
	return "too noisy (the target is within the spread)", fig
}

// writeVerdicts prints one line per target whose workload ran on its
// path.
func writeVerdicts(w io.Writer, res *Results, cfg *config) {
	first := true
	for _, t := range targets {
		r := res.find(t.Workload, t.path())
		if r == nil {
			continue
		}
		if first {
			fmt.Fprintf(w, "\ntargets:\n")
			first = false
		}
		v, fig := verdict(t, r, cfg.Spread)
		fmt.Fprintf(w, "  %-14s %-66s %-22s %s\n", t.path(), t.Name, fig, v)
	}
}
