package main

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// pathColours gives each path one colour in the chart, stable across runs.
var pathColours = map[string]string{
	pathDirect:       "#2ca02c",
	pathBare:         "#9467bd",
	pathSockmap:      "#1f77b4",
	pathSockmapUnix:  "#17becf",
	pathRelay:        "#ff7f0e",
	pathPgstore:      "#bcbd22",
	pathPgbouncer:    "#7f7f7f",
	pathPgmfaTLS:     "#d62728",
	pathPgbouncerTLS: "#8c564b",
}

// renderSVG draws the ratios to direct as grouped bars: one group per
// workload, one bar per path (median ratio, whisker from min to max round),
// a dashed line at 1.0 (direct). Hand-written SVG keeps the suite free of
// charting modules; the file opens in any browser.
func renderSVG(res *Results, paths []string, title, subtitle string) []byte {
	var shown []string // paths with bars: every path but direct, which is the 1.0 line
	for _, p := range paths {
		if p != pathDirect {
			shown = append(shown, p)
		}
	}
	var groups []string
	seen := map[string]bool{}
	for _, r := range res.Rows {
		if r.Path != pathDirect && !seen[r.Workload] && res.find(r.Workload, pathDirect) != nil {
			seen[r.Workload] = true
			groups = append(groups, r.Workload)
		}
	}
	yMax := 1.2
	for _, r := range res.Rows {
		if r.Path != pathDirect && r.Ratio.N > 0 {
			yMax = math.Max(yMax, r.Ratio.Max*1.05)
		}
	}
	// Ratios far above 1 (pgbouncer's pooled logins) would flatten every
	// other bar: clip at 2 and print the value on the clipped bar.
	yMax = math.Min(math.Ceil(yMax*5)/5, 2)

	const (
		left, right, top, bottom = 70, 20, 90, 80
		plotH                    = 320
		barW, barGap, groupPad   = 20, 3, 26
	)
	groupW := max(len(shown)*(barW+barGap)-barGap+groupPad, 96) // room for the workload's name
	plotW := max(len(groups)*groupW, 700)
	width, height := left+plotW+right, top+plotH+bottom
	y := func(v float64) float64 { return top + plotH - math.Min(v, yMax)/yMax*plotH }

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(&b, `<text x="%d" y="24" font-size="16" font-weight="bold">%s</text>`+"\n", left, esc(title))
	fmt.Fprintf(&b, `<text x="%d" y="42" font-size="11" fill="#555">%s</text>`+"\n", left, esc(subtitle))

	// Legend.
	lx := left
	for _, p := range shown {
		fmt.Fprintf(&b, `<rect x="%d" y="56" width="12" height="12" fill="%s"/><text x="%d" y="66" font-size="12">%s</text>`+"\n", lx, colour(p), lx+16, esc(p))
		lx += 24 + 7*len(p)
	}
	fmt.Fprintf(&b, `<line x1="%d" y1="62" x2="%d" y2="62" stroke="#d62728" stroke-width="2" stroke-dasharray="6,3"/><text x="%d" y="66" font-size="12">direct = 1.0</text>`+"\n", lx, lx+24, lx+28)

	// Grid and y axis.
	for v := 0.0; v <= yMax+1e-9; v += gridStep(yMax) {
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#e5e5e5"/><text x="%d" y="%.1f" font-size="11" text-anchor="end">%.1f</text>`+"\n",
			left, y(v), left+plotW, y(v), left-6, y(v)+4, v)
	}
	fmt.Fprintf(&b, `<text transform="translate(18,%d) rotate(-90)" font-size="12" text-anchor="middle">relative to direct (higher is better)</text>`+"\n", top+plotH/2)

	// Bars.
	for gi, wl := range groups {
		gx := left + gi*groupW + (groupW-(len(shown)*(barW+barGap)-barGap))/2
		for pi, p := range shown {
			x := gx + pi*(barW+barGap)
			r := res.find(wl, p)
			if r == nil {
				continue
			}
			if r.Ratio.N == 0 {
				fmt.Fprintf(&b, `<text x="%d" y="%.1f" font-size="10" fill="#d62728" text-anchor="middle" transform="rotate(-90 %d %.1f)">error</text>`+"\n",
					x+barW/2+3, y(0)-6, x+barW/2+3, y(0)-6)
				continue
			}
			m := r.Ratio.Median
			fmt.Fprintf(&b, `<rect x="%d" y="%.1f" width="%d" height="%.1f" fill="%s"><title>%s / %s: %.2f x direct (min %.2f, max %.2f)</title></rect>`+"\n",
				x, y(m), barW, y(0)-y(m), colour(p), esc(wl), esc(p), m, r.Ratio.Min, r.Ratio.Max)
			if r.Ratio.Max > yMax {
				fmt.Fprintf(&b, `<path d="M%d %.1f l%d -6 l%d 6 z" fill="white"/>`+"\n", x, y(yMax)+8, barW/2, barW/2)
			}
			if r.Ratio.N > 1 {
				cx := float64(x) + barW/2
				fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", cx, y(r.Ratio.Min), cx, y(r.Ratio.Max))
			}
			fmt.Fprintf(&b, `<text x="%d" y="%.1f" font-size="9" text-anchor="middle">%s</text>`+"\n", x+barW/2, math.Max(y(math.Max(m, r.Ratio.Max))-3, top-2), ratioLabel(m))
		}
		unit := ""
		if r := res.find(wl, pathDirect); r != nil {
			unit = r.Unit
		}
		cx := left + gi*groupW + groupW/2
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="12" text-anchor="middle">%s</text>`+"\n", cx, top+plotH+18, esc(wl))
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="10" fill="#555" text-anchor="middle">%s</text>`+"\n", cx, top+plotH+32, esc(unit))
	}
	fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="black"/>`+"\n", left, y(0), left+plotW, y(0))
	fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#d62728" stroke-width="2" stroke-dasharray="6,3"/>`+"\n", left, y(1), left+plotW, y(1))
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="10" fill="#555">bars: median of per-round ratios; whiskers: min..max round. Memory-per-session workloads have no direct figure and are in the table and JSON only.</text>`+"\n", left, height-14)
	b.WriteString("</svg>\n")
	return []byte(b.String())
}

// ratioLabel fits a bar's width: two decimals where they matter (near 1),
// fewer on clipped bars far above it.
func ratioLabel(v float64) string {
	switch {
	case v >= 10:
		return fmt.Sprintf("%.0f", v)
	case v >= 2:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

func gridStep(yMax float64) float64 {
	if yMax > 2.5 {
		return 0.5
	}
	return 0.2
}

func colour(p string) string {
	if c, ok := pathColours[p]; ok {
		return c
	}
	return "#9467bd"
}

func esc(s string) string { return html.EscapeString(s) }
