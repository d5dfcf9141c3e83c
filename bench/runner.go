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
// (cold caches) or last.
func measureAll(ctx context.Context, e *env, prog *progress) *Results {
	ws := selectedWorkloads(e.cfg)
	total := 0
	for _, w := range ws {
		for _, p := range e.cfg.Paths {
			if w.Applies(p) {
				total++
			}
		}
	}
	prog.begin(total * e.cfg.Rounds)
	res := &Results{}
	for round := 1; round <= e.cfg.Rounds && ctx.Err() == nil; round++ {
		order := rotate(e.cfg.Paths, round-1)
		for _, w := range ws {
			for _, p := range order {
				if !w.Applies(p) || ctx.Err() != nil {
					continue
				}
				prog.start(fmt.Sprintf("round %d/%d  %-13s %s", round, e.cfg.Rounds, w.Name, p))
				s := measureOne(ctx, e, w, e.endpoints[p], round)
				res.row(w, p).Samples = append(res.row(w, p).Samples, s)
				prog.done(describeSample(s, w.Unit))
			}
		}
	}
	res.relate()
	return res
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
	t0 := time.Now()
	v, detail, err := w.Run(ctx, e, ep)
	s.Seconds = time.Since(t0).Seconds()
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
