package main

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
)

// writeTable prints the results, one line per workload and path: median
// with min..max over the rounds, the median same-round ratio to direct with
// its spread (marked "?" when wider than -spread: too noisy to read), the
// extra milliseconds for latencies, the CPU the path's process used, and
// context switches per transaction (proxy / postgres / kworkers / whole
// machine).
func writeTable(w io.Writer, res *Results, cfg *config) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "workload\tpath\tmedian\tmin..max\trounds\tunit\tx direct ±spread\tvs direct\tproxy CPU s\tctx sw/tx proxy/pg/kworker/system\t\n")
	prev := ""
	noisy := 0
	for _, r := range res.Rows {
		if prev != "" && r.Workload != prev {
			fmt.Fprintln(tw, "\t\t\t\t\t\t\t\t\t\t")
		}
		prev = r.Workload
		if r.Value.N == 0 {
			fmt.Fprintf(tw, "%s\t%s\t%s\t\t%d\t%s\t\t\t\t\t\n", r.Workload, r.Path, "ERROR", len(r.Samples), r.Unit)
			continue
		}
		rng := fmtNum(r.Value.Min) + ".." + fmtNum(r.Value.Max)
		ratio, vs := "", ""
		mark := ""
		if r.Path != pathDirect && !r.settled(cfg.Spread) {
			mark = " ?"
			noisy++
		}
		if r.Ratio.N > 0 && r.Path != pathDirect {
			ratio = fmt.Sprintf("%.2f %s%s", r.Ratio.Median, fmtSpread(r.RatioSpread, "%.2f"), mark)
		} else if r.Path != pathDirect && r.Value.N > 0 {
			ratio = fmt.Sprintf("(value %s)%s", fmtSpread(r.ValueSpread, "%.1f"), mark)
		}
		if r.Delta.N > 0 && r.Path != pathDirect {
			vs = fmt.Sprintf("%+.2f %s ms", r.Delta.Median, fmtSpread(r.DeltaSpread, "%.2f"))
		}
		cpu := ""
		if r.CPU.N > 0 {
			cpu = fmt.Sprintf("%.2f", r.CPU.Median)
		}
		cs := ""
		if c := r.CtxPerTx; !math.IsNaN(c[1]) {
			p := "-"
			if !math.IsNaN(c[0]) {
				p = fmt.Sprintf("%.1f", c[0])
			}
			cs = fmt.Sprintf("%s/%.1f/%.1f/%.1f", p, c[1], c[2], c[3])
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t\n", r.Workload, r.Path, fmtNum(r.Value.Median), rng, r.Value.N, r.Unit, ratio, vs, cpu, cs)
	}
	tw.Flush()
	fmt.Fprintf(w, "\n±: median absolute deviation over the rounds (same-round ratios to direct; ms for \"vs direct\").\n")
	if noisy > 0 {
		fmt.Fprintf(w, "?: %d figure(s) spread wider than -spread %.2f after -max-rounds %d: too noisy to read.\n", noisy, cfg.Spread, cfg.MaxRounds)
	}
	if errs := errorLines(res); len(errs) > 0 {
		fmt.Fprintf(w, "\nerrors:\n  %s\n", strings.Join(errs, "\n  "))
	}
}

// fmtSpread prints a spread as ±x, or "±?" when one round cannot tell.
func fmtSpread(s float64, format string) string {
	if math.IsNaN(s) {
		return "±?"
	}
	return "±" + fmt.Sprintf(format, s)
}

// errorLines lists each path's distinct errors once, whole (the table has
// no room for them), with the workloads that hit them.
func errorLines(res *Results) []string {
	type key struct{ path, msg string }
	var order []key
	where := map[key][]string{}
	for _, r := range res.Rows {
		for _, e := range r.Errors() {
			k := key{r.Path, e}
			if _, ok := where[k]; !ok {
				order = append(order, k)
			}
			where[k] = append(where[k], r.Workload)
		}
	}
	var out []string
	for _, k := range order {
		out = append(out, fmt.Sprintf("%s [%s]: %s", k.path, strings.Join(where[k], ", "), k.msg))
	}
	return out
}

// fmtNum prints a figure with about four significant digits.
func fmtNum(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "-"
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 100:
		return fmt.Sprintf("%.1f", v)
	case a >= 10:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}
