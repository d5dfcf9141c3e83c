package main

import (
	"math"
	"sort"
)

// Summary condenses one figure measured over several rounds.
type Summary struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

// summarize returns the median, minimum and maximum of xs, ignoring NaNs
// (a failed round). N is 0 when nothing was left.
func summarize(xs []float64) Summary {
	v := make([]float64, 0, len(xs))
	for _, x := range xs {
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return Summary{Median: math.NaN(), Min: math.NaN(), Max: math.NaN()}
	}
	sort.Float64s(v)
	s := Summary{Min: v[0], Max: v[len(v)-1], N: len(v)}
	if n := len(v); n%2 == 1 {
		s.Median = v[n/2]
	} else {
		s.Median = (v[n/2-1] + v[n/2]) / 2
	}
	return s
}

// ratioToDirect expresses a path's figure relative to direct's figure from
// the same round, oriented so that 1.0 is "as good as direct" and lower is
// worse whichever way the unit points: throughput divides by direct,
// latency divides direct by it. NaN when either side is missing.
func ratioToDirect(value, direct float64, higherBetter bool) float64 {
	if math.IsNaN(value) || math.IsNaN(direct) || value <= 0 || direct <= 0 {
		return math.NaN()
	}
	if higherBetter {
		return value / direct
	}
	return direct / value
}
