package main

import (
	"encoding/json"
	"math"
	"time"
)

// Sample is one measurement: one workload on one path in one round.
type Sample struct {
	Round int `json:"round"`
	// Value is the figure in the workload's unit; NaN (null in JSON) when the
	// run failed.
	Value float64 `json:"value"`
	// Ratio is Value relative to direct from the same round (see
	// ratioToDirect); NaN when there is no direct figure.
	Ratio float64 `json:"ratio"`
	// DeltaToDirect is Value minus direct's Value from the same round, for
	// lower-is-better units (the milliseconds MFA adds to a login).
	DeltaToDirect float64 `json:"delta_to_direct"`
	// CPUSeconds is user+system CPU the path's own process (pgmfa or
	// pgbouncer) used during the run; NaN for direct.
	CPUSeconds float64 `json:"cpu_seconds"`
	Seconds    float64 `json:"seconds"` // wall time of the measured part
	// Detail holds the raw figures behind Value (transactions, bytes,
	// RSS before/after, ...).
	Detail map[string]float64 `json:"detail,omitempty"`
	Err    string             `json:"error,omitempty"`
	At     time.Time          `json:"at"`
}

// MarshalJSON writes NaN figures as null: JSON has no NaN.
func (s Sample) MarshalJSON() ([]byte, error) {
	type plain Sample
	return json.Marshal(struct {
		plain
		Value         *float64 `json:"value"`
		Ratio         *float64 `json:"ratio"`
		DeltaToDirect *float64 `json:"delta_to_direct"`
		CPUSeconds    *float64 `json:"cpu_seconds"`
	}{plain(s), num(s.Value), num(s.Ratio), num(s.DeltaToDirect), num(s.CPUSeconds)})
}

func num(f float64) *float64 {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return nil
	}
	return &f
}

// Row is every round of one workload on one path, and their summaries.
type Row struct {
	Workload     string   `json:"workload"`
	Path         string   `json:"path"`
	Unit         string   `json:"unit"`
	HigherBetter bool     `json:"higher_is_better"`
	Samples      []Sample `json:"samples"`
	Value        Summary  `json:"value"`
	Ratio        Summary  `json:"ratio"`
	Delta        Summary  `json:"delta_to_direct"`
	CPU          Summary  `json:"cpu_seconds"`
	// Spreads (spread.go): median absolute deviation over the rounds of
	// the ratio, the value and the difference to direct; NaN (null) with
	// fewer than two rounds.
	RatioSpread float64 `json:"ratio_spread"`
	ValueSpread float64 `json:"value_spread"`
	DeltaSpread float64 `json:"delta_spread"`
	// CtxPerTx is the median context switches per transaction (or login)
	// over the rounds: proxy, postgres, kworker, system (ctxsw.go).
	CtxPerTx [4]float64 `json:"-"`
}

// MarshalJSON keeps NaN spreads out of the file.
func (r *Row) MarshalJSON() ([]byte, error) {
	type plain Row
	return json.Marshal(struct {
		*plain
		RatioSpread *float64            `json:"ratio_spread"`
		ValueSpread *float64            `json:"value_spread"`
		DeltaSpread *float64            `json:"delta_spread"`
		CtxPerTx    map[string]*float64 `json:"context_switches_per_tx,omitempty"`
	}{(*plain)(r), num(r.RatioSpread), num(r.ValueSpread), num(r.DeltaSpread),
		map[string]*float64{"proxy": num(r.CtxPerTx[0]), "postgres": num(r.CtxPerTx[1]), "kworker": num(r.CtxPerTx[2]), "system": num(r.CtxPerTx[3])}})
}

// MarshalJSON for Summary keeps NaN out of the file too.
func (s Summary) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Median *float64 `json:"median"`
		Min    *float64 `json:"min"`
		Max    *float64 `json:"max"`
		N      int      `json:"n"`
	}{num(s.Median), num(s.Min), num(s.Max), s.N})
}

// Errors returns the distinct error messages of the row's failed rounds.
func (r *Row) Errors() []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range r.Samples {
		if s.Err != "" && !seen[s.Err] {
			seen[s.Err] = true
			out = append(out, s.Err)
		}
	}
	return out
}

// finish fills the summaries from the samples.
func (r *Row) finish() {
	var v, ratio, delta, cpu []float64
	var cs [4][]float64
	for _, s := range r.Samples {
		v = append(v, s.Value)
		ratio = append(ratio, s.Ratio)
		delta = append(delta, s.DeltaToDirect)
		cpu = append(cpu, s.CPUSeconds)
		for i, k := range []string{"cs_per_tx_proxy", "cs_per_tx_postgres", "cs_per_tx_kworker", "cs_per_tx_system"} {
			if x, ok := s.Detail[k]; ok && !math.IsNaN(s.Value) {
				cs[i] = append(cs[i], x)
			}
		}
	}
	r.Value, r.Ratio, r.Delta, r.CPU = summarize(v), summarize(ratio), summarize(delta), summarize(cpu)
	r.RatioSpread, r.ValueSpread, r.DeltaSpread = mad(ratio), mad(v), mad(delta)
	for i := range cs {
		r.CtxPerTx[i] = summarize(cs[i]).Median
	}
}

// Results holds the rows in the order they were first measured.
type Results struct {
	Rows []*Row
	idx  map[[2]string]*Row
}

// row returns (creating) the row for a workload and path.
func (rs *Results) row(w *workload, path string) *Row {
	if rs.idx == nil {
		rs.idx = map[[2]string]*Row{}
	}
	k := [2]string{w.Name, path}
	if r, ok := rs.idx[k]; ok {
		return r
	}
	r := &Row{Workload: w.Name, Path: path, Unit: w.Unit, HigherBetter: w.HigherBetter}
	rs.idx[k] = r
	rs.Rows = append(rs.Rows, r)
	return r
}

// find returns the row for a workload and path, or nil.
func (rs *Results) find(workload, path string) *Row { return rs.idx[[2]string{workload, path}] }

// relate fills each sample's ratio and delta against direct's sample from
// the same round, then the summaries.
func (rs *Results) relate() {
	for _, r := range rs.Rows {
		d := rs.find(r.Workload, pathDirect)
		for i := range r.Samples {
			s := &r.Samples[i]
			s.Ratio, s.DeltaToDirect = math.NaN(), math.NaN()
			if d == nil {
				continue
			}
			for _, ds := range d.Samples {
				if ds.Round == s.Round {
					s.Ratio = ratioToDirect(s.Value, ds.Value, r.HigherBetter)
					if !r.HigherBetter && !math.IsNaN(s.Value) && !math.IsNaN(ds.Value) {
						s.DeltaToDirect = s.Value - ds.Value
					}
				}
			}
		}
		r.finish()
	}
}
