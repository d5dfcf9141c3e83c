package main

import (
	"context"
	"fmt"
	"math"
	"strings"
	"time"
)

// selectedWorkloads returns the workloads -workloads chose, in table order.
func selectedWorkloads(cfg *config) []*workload {
	want := map[string]bool{}
	for _, n := range cfg.Workloads {
		want[n] = true
	}
	var out []*workload
	for _, w := range workloadList(cfg.Clients) {
		if want[w.Name] {
			out = append(out, w)
		}
	}
	return out
}

// measureAll runs the rounds. Within a round every workload is measured on
// every path back to back, so that each path's ratio compares it with a
// direct run made moments before, under the same background load. The path
// order rotates from round to round so that no path always runs first
// (cold caches) or last. After -rounds, a workload whose ratios are still
// spread wider than -spread gets another round, up to -max-rounds
// (spread.go); settled workloads are not run again.
func measureAll(ctx context.Context, e *env, prog *progress) *Results {
	ws := selectedWorkloads(e.cfg)
	perRound := func(ws []*workload) int {
		n := 0
		for _, w := range ws {
			for _, p := range e.cfg.Paths {
				if w.Applies(p) {
					n++
				}
			}
		}
		return n
	}
	prog.begin(perRound(ws) * e.cfg.Rounds)
	res := &Results{}
	for round := 1; round <= e.cfg.MaxRounds && ctx.Err() == nil; round++ {
		todo := ws
		if round > e.cfg.Rounds {
			res.relate()
			todo = unsettled(res, ws, e.cfg)
			if len(todo) == 0 {
				break
			}
			prog.total += perRound(todo)
			names := make([]string, len(todo))
			for i, w := range todo {
				names[i] = w.Name
			}
			prog.log("round %d: spread still above %.2f for %s", round, e.cfg.Spread, strings.Join(names, ", "))
		}
		order := rotate(e.cfg.Paths, round-1)
		for _, w := range todo {
			for _, p := range order {
				if !w.Applies(p) || ctx.Err() != nil {
					continue
				}
				of := fmt.Sprintf("%d/%d", round, e.cfg.Rounds)
				if round > e.cfg.Rounds {
					of = fmt.Sprintf("%d (extra, at most %d)", round, e.cfg.MaxRounds)
				}
				prog.start(fmt.Sprintf("round %s  %-13s %s", of, w.Name, p))
				s := measureOne(ctx, e, w, e.endpoints[p], round)
				res.row(w, p).Samples = append(res.row(w, p).Samples, s)
				prog.done(describeSample(s, w.Unit))
			}
		}
	}
	res.relate()
	return res
}

// unsettled returns the workloads with a row whose spread is still above
// the target (spread.go).
func unsettled(res *Results, ws []*workload, cfg *config) []*workload {
	var out []*workload
	for _, w := range ws {
		for _, p := range cfg.Paths {
			if r := res.find(w.Name, p); r != nil && !r.settled(cfg.Spread) {
				out = append(out, w)
				break
			}
		}
	}
	return out
}

// rotate returns s rotated left by k.
func rotate(s []string, k int) []string {
	if len(s) == 0 {
		return nil
	}
	k %= len(s)
	return append(append([]string(nil), s[k:]...), s[:k]...)
}

// measureOne runs one workload once on one path, with the path's CPU time.
func measureOne(ctx context.Context, e *env, w *workload, ep *endpoint, round int) Sample {
	s := Sample{Round: round, At: time.Now().UTC(), Value: math.NaN(), CPUSeconds: math.NaN()}
	if ep.Err != nil {
		s.Err = "path not running: " + firstLine(ep.Err.Error())
		return s
	}
	pid := ep.PID()
	cpu0, cpuErr := 0.0, error(nil)
	if pid != 0 {
		cpu0, cpuErr = procCPU(pid)
	}
	pgPID := 0
	if e.cluster != nil {
		pgPID = e.cluster.PID()
	}
	cs := startCtxSampler(pid, pgPID)
	t0 := time.Now()
	v, detail, err := w.Run(ctx, e, ep)
	s.Seconds = time.Since(t0).Seconds()
	csProxy, csPG, csKw, csSys := cs.stop()
	if detail == nil {
		detail = map[string]float64{}
	}
	addCtxDetail(detail, csProxy, csPG, csKw, csSys, pid != 0)
	if pid != 0 && cpuErr == nil {
		if cpu1, err := procCPU(pid); err == nil {
			s.CPUSeconds = cpu1 - cpu0
		}
	}
	s.Detail = detail
	if ep.Cmd != nil && e.procs.exited(ep.Cmd) {
		// A crashed proxy fails this and every later measurement on its path.
		ep.Err = fmt.Errorf("%s exited (%v): %s", ep.Name, ep.Cmd.ProcessState, lastLine(tail(ep.LogFile, 2000)))
		if err == nil {
			err = ep.Err
		}
	}
	if err != nil {
		s.Err = firstLine(err.Error())
		return s
	}
	s.Value = v
	return s
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// describeSample is the one-line result the progress display shows.
func describeSample(s Sample, unit string) string {
	if s.Err != "" {
		return "ERROR " + s.Err
	}
	return fmt.Sprintf("%s %s", fmtNum(s.Value), unit)
}
