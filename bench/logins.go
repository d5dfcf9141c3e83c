package main

import (
	"context"
	"fmt"
	"time"
)

// pacedLoginGap is the pause between logins of login-latency-paced: long
// enough for the database to have finished with the previous login (its
// backend's exit) and for a spare connection's backend to be forked and
// waiting, as between the requests of an application that connects per
// request at tens of requests a second.
const pacedLoginGap = 50 * time.Millisecond

// loginLatency logs in and out one login after another (gap apart) for
// -duration and returns the median milliseconds from dial to
// ReadyForQuery. On pgmfa
// paths the code is sent every time (and --mfa-remember is on, as with
// pgbench), so the figure is what MFA adds to a login a pool or a script
// makes; the median of each step of pgmfa's own login timing is kept too
// (breakdown.go).
func (e *env) loginLatency(ctx context.Context, ep *endpoint, gap time.Duration) (float64, map[string]float64, error) {
	var ms []float64
	from := int64(-1)
	if isPgmfa(ep.Name) && ep.LogFile != "" {
		from = logSize(ep.LogFile)
	}
	deadline := time.Now().Add(e.cfg.Duration)
	for time.Now().Before(deadline) || len(ms) < 5 {
		if len(ms) >= 5 && ctx.Err() != nil {
			break
		}
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		t0 := time.Now()
		conn, err := connect(cctx, ep, benchUser, true, nil, nil)
		d := time.Since(t0)
		cancel()
		if err != nil {
			return 0, nil, fmt.Errorf("login %d: %w", len(ms)+1, err)
		}
		conn.Close(context.Background())
		ms = append(ms, float64(d.Microseconds())/1000)
		if gap > 0 {
			time.Sleep(gap)
		}
	}
	s := summarize(ms)
	detail := map[string]float64{"logins": float64(len(ms)), "min_ms": s.Min, "max_ms": s.Max}
	if from >= 0 {
		addBreakdown(detail, ep.LogFile, from)
	}
	return s.Median, detail, nil
}
