package main

import (
	"math"
	"sort"
)

// How far a figure can be trusted on a noisy machine.
//
// The spread of a row is the median absolute deviation (MAD) of its
// per-round ratios to direct: median(|r_i - median(r)|). It is robust to
// one disturbed round (a build on the other core moves one round, not the
// median of the deviations), needs no assumption about the distribution,
// and reads in the ratio's own unit: "0.83 ±0.02" means half of the rounds
// were within 0.02 of 0.83. Rows without a ratio (memory per session) use
// the MAD of their values; latency rows also carry the MAD of their
// per-round differences to direct (the milliseconds a login costs).
//
// The runner keeps adding rounds for a workload (every path again,
// interleaved, so each ratio still compares with a direct run made
// moments before) until every one of its rows is at or below -spread or
// -max-rounds is reached; a row still wider than -spread is marked as too
// noisy to read.

// mad is the median absolute deviation of the finite xs around their
// median; NaN with fewer than two finite values (one round has no spread).
func mad(xs []float64) float64 {
	v := finite(xs)
	if len(v) < 2 {
		return math.NaN()
	}
	m := median(v)
	dev := make([]float64, len(v))
	for i, x := range v {
		dev[i] = math.Abs(x - m)
	}
	return median(dev)
}

func finite(xs []float64) []float64 {
	v := make([]float64, 0, len(xs))
	for _, x := range xs {
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			v = append(v, x)
		}
	}
	return v
}

// median of a non-empty slice (sorted in place).
func median(v []float64) float64 {
	sort.Float64s(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

// settled reports whether a row's figure is as tight as target: its ratio
// spread (or, without a ratio, its value spread relative to the value) is
// known and at most target. A row with no figure at all counts as settled:
// more rounds do not mend a path that fails.
func (r *Row) settled(target float64) bool {
	if r.Value.N == 0 {
		return true
	}
	s := r.spread()
	return !math.IsNaN(s) && s <= target
}

// spread is the row's spread in the terms settled compares: the ratio's
// MAD, or for rows without ratios the value's MAD relative to its median.
func (r *Row) spread() float64 {
	if r.Path == pathDirect {
		return 0 // direct is the reference, its rows carry no ratio
	}
	if r.Ratio.N > 0 {
		return r.RatioSpread
	}
	if r.Value.N > 0 && r.Value.Median > 0 {
		return r.ValueSpread / r.Value.Median
	}
	return math.NaN()
}
