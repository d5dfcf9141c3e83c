package main

import (
	"fmt"
	"io"
	"math"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// The login breakdown: pgmfa logs one "login timing" line per login at
// --log-level debug (loop/timing.go), the time of each step from accept to
// the release. The login-latency workload reads the lines its own logins
// produced and keeps the median of each step, so the table can say where
// a login's extra time goes: the proxy's own steps (accept_to_loop, dial,
// mfa, release, splice, in_loop) against the client's and the database's.

// breakdownSteps are the steps in the order of a login, with what owns them.
var breakdownSteps = []struct{ key, owner string }{
	{"accept_to_loop", "proxy"},
	{"client_startup", "client"},
	{"dial", "proxy+kernel"},
	{"db_first_auth", "database"},
	{"auth_exchange", "client+database (relayed)"},
	{"mfa", "proxy"},
	{"release", "proxy"},
	{"total", "accept to release"},
	{"splice", "proxy+kernel (after the release)"},
	{"in_loop", "proxy (callbacks, within the above)"},
}

var timingField = regexp.MustCompile(`\b([a-z_]+)_us[=":]+(\d+)`)

// spareField is the line's "spare" flag: the login ran on a spare
// database connection (--spare-conns), opened before the client came.
var spareField = regexp.MustCompile(`\bspare[=":]+(true|false)`)

// parseLoginTimings returns each step's values (ms) from the "login
// timing" lines in log (text or JSON).
func parseLoginTimings(log string) map[string][]float64 {
	out := map[string][]float64{}
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, "login timing") {
			continue
		}
		for _, m := range timingField.FindAllStringSubmatch(line, -1) {
			if us, err := strconv.ParseFloat(m[2], 64); err == nil {
				out[m[1]] = append(out[m[1]], us/1000)
			}
		}
		if m := spareField.FindStringSubmatch(line); m != nil {
			out["spare"] = append(out["spare"], map[string]float64{"true": 1, "false": 0}[m[1]])
		}
	}
	return out
}

// logSize is the log's current size, where a measurement starts reading.
func logSize(path string) int64 {
	if fi, err := os.Stat(path); err == nil {
		return fi.Size()
	}
	return 0
}

// addBreakdown puts the median of each step since offset into detail as
// step_<key>_ms.
func addBreakdown(detail map[string]float64, logFile string, offset int64) {
	f, err := os.Open(logFile)
	if err != nil {
		return
	}
	defer f.Close()
	b, _ := io.ReadAll(io.NewSectionReader(f, offset, 1<<40))
	for k, v := range parseLoginTimings(string(b)) {
		switch {
		case len(v) == 0:
		case k == "spare":
			detail["spare_share"] = mean(v)
		default:
			detail["step_"+k+"_ms"] = median(v)
		}
	}
}

// writeBreakdown prints, for each path with login-latency steps, the median
// over the rounds of each step's median.
func writeBreakdown(w io.Writer, res *Results) {
	var rows []*Row
	for _, r := range res.Rows {
		if strings.HasPrefix(r.Workload, "login-latency") {
			if _, ok := stepMedian(r, "total"); ok {
				rows = append(rows, r)
			}
		}
	}
	if len(rows) == 0 {
		return
	}
	fmt.Fprintf(w, "\nlogin breakdown (median ms per step, from pgmfa's \"login timing\" lines):\n")
	fmt.Fprintf(w, "  %-16s %-30s", "step", "whose time")
	for _, r := range rows {
		fmt.Fprintf(w, " %14s", r.Path)
	}
	fmt.Fprintln(w)
	if len(rows) > 1 {
		fmt.Fprintf(w, "  %-16s %-30s", "", "")
		for _, r := range rows {
			fmt.Fprintf(w, " %14s", strings.TrimPrefix(strings.TrimPrefix(r.Workload, "login-latency"), "-"))
		}
		fmt.Fprintln(w)
	}
	for _, s := range breakdownSteps {
		fmt.Fprintf(w, "  %-16s %-30s", s.key, s.owner)
		for _, r := range rows {
			if v, ok := stepMedian(r, s.key); ok {
				fmt.Fprintf(w, " %14.3f", v)
			} else {
				fmt.Fprintf(w, " %14s", "-")
			}
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "  %-16s %-30s", "on a spare", "share of logins (--spare-conns)")
	for _, r := range rows {
		if v, ok := detailMedian(r, "spare_share"); ok {
			fmt.Fprintf(w, " %14.2f", v)
		} else {
			fmt.Fprintf(w, " %14s", "-")
		}
	}
	fmt.Fprintln(w)
}

func stepMedian(r *Row, key string) (float64, bool) { return detailMedian(r, "step_"+key+"_ms") }

// detailMedian is the median over the rounds of one detail figure.
func detailMedian(r *Row, key string) (float64, bool) {
	var v []float64
	for _, s := range r.Samples {
		if x, ok := s.Detail[key]; ok && !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return 0, false
	}
	return median(v), true
}

// mean of a non-empty slice.
func mean(v []float64) float64 {
	sum := 0.0
	for _, x := range v {
		sum += x
	}
	return sum / float64(len(v))
}
