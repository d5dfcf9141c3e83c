package main

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
)

// writeTable prints the results, one line per workload and path: median
// with min..max over the rounds, the median same-round ratio to direct, the
// extra milliseconds for latencies, and the CPU the path's process used.
func writeTable(w io.Writer, res *Results, rounds int) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "workload\tpath\tmedian\tmin..max (%d rounds)\tunit\tx direct\tvs direct\tproxy CPU s\t\n", rounds)
	prev := ""
	for _, r := range res.Rows {
		if prev != "" && r.Workload != prev {
			fmt.Fprintln(tw, "\t\t\t\t\t\t\t\t")
		}
		prev = r.Workload
		if r.Value.N == 0 {
			fmt.Fprintf(tw, "%s\t%s\t%s\t\t%s\t\t\t\t\n", r.Workload, r.Path, "ERROR", r.Unit)
			continue
		}
		rng := fmtNum(r.Value.Min) + ".." + fmtNum(r.Value.Max)
		ratio, vs := "", ""
		if r.Ratio.N > 0 && r.Path != pathDirect {
			ratio = fmt.Sprintf("%.2f", r.Ratio.Median)
		}
		if r.Delta.N > 0 && r.Path != pathDirect {
			vs = fmt.Sprintf("%+.2f ms", r.Delta.Median)
		}
		cpu := ""
		if r.CPU.N > 0 {
			cpu = fmt.Sprintf("%.2f", r.CPU.Median)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.Workload, r.Path, fmtNum(r.Value.Median), rng, r.Unit, ratio, vs, cpu)
	}
	tw.Flush()
	if errs := errorLines(res); len(errs) > 0 {
		fmt.Fprintf(w, "\nerrors:\n  %s\n", strings.Join(errs, "\n  "))
	}
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
