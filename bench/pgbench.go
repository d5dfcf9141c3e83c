package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// pgbenchBin prefers the cluster's own pgbench (same major version).
func (e *env) pgbenchBin() string {
	p := filepath.Join(e.cluster.BinDir, "pgbench")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	return "pgbench"
}

// pgbench runs one timed pgbench against ep as the bench user. -n skips
// pgbench's vacuum, which is not part of any path's cost.
func (e *env) pgbench(ctx context.Context, ep *endpoint, args ...string) (pgbenchResult, error) {
	return e.pgbenchFor(ctx, ep, max(1, int(e.cfg.Duration.Round(time.Second)/time.Second)), args...)
}

// pgbenchFor is pgbench for secs seconds instead of -duration. pgbench's -T
// clock includes connecting its clients, which with many clients and short
// runs (smoke) can eat most of the run and leave a rate computed from a
// handful of transactions. Such a run is repeated (up to twice) with its
// length plus the connection time doubled (at least 10 s after a run that
// completed no transaction).
func (e *env) pgbenchFor(ctx context.Context, ep *endpoint, secs int, args ...string) (pgbenchResult, error) {
	for attempt := 0; ; attempt++ {
		r, err := e.pgbenchOnce(ctx, ep, secs, args)
		// Smoke runs only need a figure, not a good one.
		starved := errors.Is(err, errStarved) ||
			(!e.cfg.Smoke && err == nil && r.ConnTimeMS > 250*float64(secs) && !slices.Contains(args, "-C"))
		if attempt == 2 || !starved || ctx.Err() != nil {
			return r, err
		}
		secs = 2*secs + int(math.Ceil(r.ConnTimeMS/1000))
		if errors.Is(err, errStarved) {
			// No transaction at all, so no connection time either: on
			// a loaded 2-core machine 64 SCRAM logins once took over
			// 4 s (16 logins/s); give the retry room for that.
			secs = max(secs, 10)
		}
	}
}

func (e *env) pgbenchOnce(ctx context.Context, ep *endpoint, secs int, args []string) (pgbenchResult, error) {
	opts, err := ep.options(benchUser)
	if err != nil {
		return pgbenchResult{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second+2*time.Minute)
	defer cancel()
	full := append([]string{"-n", "-T", strconv.Itoa(secs)}, args...)
	full = append(full, benchDB)
	cmd := exec.CommandContext(ctx, e.pgbenchBin(), full...)
	cmd.Env = append(os.Environ(),
		"PGHOST="+ep.Host, "PGPORT="+strconv.Itoa(ep.Port), "PGUSER="+benchUser,
		"PGPASSWORD="+benchPassword, "PGSSLMODE="+ep.sslmode(), "PGOPTIONS="+opts,
		"PGAPPNAME=pgmfa-bench", "PGCONNECT_TIMEOUT=30")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	runErr := cmd.Run()
	r, perr := parsePgbench(out.String())
	what := strings.Join(args, " ")
	switch {
	case ctx.Err() != nil:
		return r, fmt.Errorf("pgbench %s: %w", what, ctx.Err())
	case perr != nil:
		return r, fmt.Errorf("pgbench %s: %w", what, perr)
	case runErr != nil:
		return r, fmt.Errorf("pgbench %s: %v: %s", what, runErr, lastLine(out.String()))
	}
	return r, nil
}

func (r pgbenchResult) detail() map[string]float64 {
	return map[string]float64{"transactions": float64(r.Transactions), "latency_avg_ms": r.LatencyMS, "connection_time_ms": r.ConnTimeMS}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
