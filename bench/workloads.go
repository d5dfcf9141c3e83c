package main

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"time"
)

// workload is one kind of measurement, run on every path that it applies to.
type workload struct {
	Name         string
	Unit         string
	Desc         string
	HigherBetter bool
	// Applies says whether the workload means anything on a path (memory
	// per session has no direct figure; only pgmfa has an MFA wait).
	Applies func(path string) bool
	// Run measures once. The runner times it and accounts the path's CPU.
	Run func(ctx context.Context, env *env, ep *endpoint) (float64, map[string]float64, error)
}

func everyPath(string) bool { return true }

// sessionPath: every path whose sessions are measured (not the login-only
// ones).
func sessionPath(p string) bool { return !loginOnly(p) }

// proxiedPath: a path through a proxy whose sessions are measured.
func proxiedPath(p string) bool { return p != pathDirect && p != pathBare && !loginOnly(p) }

// workloadNames lists the workload names for the given -clients.
func workloadNames(clients []int) []string {
	var out []string
	for _, w := range workloadList(clients) {
		out = append(out, w.Name)
	}
	return out
}

// workloadList defines the workloads, in table order.
func workloadList(clients []int) []*workload {
	var ws []*workload
	for _, c := range clients {
		ws = append(ws, pgbenchWorkload(fmt.Sprintf("select-%d", c), c, "pgbench -S (simple protocol)", "-S"))
	}
	prep := 16
	ws = append(ws, pgbenchWorkload(fmt.Sprintf("prepared-%d", prep), prep, "pgbench -S -M prepared", "-S", "-M", "prepared"))
	ws = append(ws,
		&workload{Name: "copy-out", Unit: "MB/s", HigherBetter: true, Applies: sessionPath,
			Desc: "COPY (generate_series) TO STDOUT, -bulk-mb MB, bytes received per second",
			Run: func(ctx context.Context, e *env, ep *endpoint) (float64, map[string]float64, error) {
				return e.copyOut(ctx, ep)
			}},
		&workload{Name: "copy-in", Unit: "MB/s", HigherBetter: true, Applies: sessionPath,
			Desc: "COPY FROM STDIN of -bulk-mb MB of generated rows into an unlogged table (emptied before each run), bytes sent per second until CommandComplete; row count and checksum verified after",
			Run: func(ctx context.Context, e *env, ep *endpoint) (float64, map[string]float64, error) {
				return e.copyIn(ctx, ep)
			}},
		&workload{Name: "select-bulk", Unit: "MB/s", HigherBetter: true, Applies: sessionPath,
			Desc: "SELECT returning 3/5 of -bulk-mb MB of DataRows, bytes received per second",
			Run: func(ctx context.Context, e *env, ep *endpoint) (float64, map[string]float64, error) {
				return e.selectBulk(ctx, ep)
			}},
		&workload{Name: "connect", Unit: "logins/s", HigherBetter: true, Applies: everyPath,
			Desc: "pgbench -S -C: a new connection (SCRAM at the database, MFA code via PGOPTIONS) per transaction",
			Run:  runConnect},
		&workload{Name: "login-latency", Unit: "ms/login", HigherBetter: false, Applies: everyPath,
			Desc: "median time of one login (connect to ReadyForQuery), logins one after another",
			Run: func(ctx context.Context, e *env, ep *endpoint) (float64, map[string]float64, error) {
				return e.loginLatency(ctx, ep, 0)
			}},
		&workload{Name: "login-latency-paced", Unit: "ms/login", HigherBetter: false, Applies: everyPath,
			Desc: fmt.Sprintf("as login-latency, with %s between logins: an application that connects per request at a moderate rate (where --spare-conns can have a backend ready)", pacedLoginGap),
			Run: func(ctx context.Context, e *env, ep *endpoint) (float64, map[string]float64, error) {
				return e.loginLatency(ctx, ep, pacedLoginGap)
			}},
		&workload{Name: "idle-rss", Unit: "KiB/session", HigherBetter: false, Applies: proxiedPath,
			Desc: "proxy RSS growth per logged-in idle session, -sessions held open",
			Run: func(ctx context.Context, e *env, ep *endpoint) (float64, map[string]float64, error) {
				return e.sessionRSS(ctx, ep, false)
			}},
		&workload{Name: "mfa-wait-rss", Unit: "KiB/session", HigherBetter: false, Applies: func(p string) bool { return isPgmfa(p) && !loginOnly(p) },
			Desc: "proxy RSS growth per session waiting for MFA approval (no code sent), -sessions held open",
			Run: func(ctx context.Context, e *env, ep *endpoint) (float64, map[string]float64, error) {
				return e.sessionRSS(ctx, ep, true)
			}},
	)
	return ws
}

// threadsFor picks pgbench -j: one thread per core at most, never more than
// clients (pgbench refuses that).
func threadsFor(clients int) int {
	return min(clients, runtime.NumCPU())
}

func pgbenchWorkload(name string, clients int, desc string, args ...string) *workload {
	return &workload{Name: name, Unit: "tps", HigherBetter: true, Applies: sessionPath,
		Desc: fmt.Sprintf("%s, %d clients", desc, clients),
		Run: func(ctx context.Context, e *env, ep *endpoint) (float64, map[string]float64, error) {
			a := append([]string{"-c", strconv.Itoa(clients), "-j", strconv.Itoa(threadsFor(clients))}, args...)
			r, err := e.pgbench(ctx, ep, a...)
			if err != nil {
				return 0, nil, err
			}
			return r.TPS, r.detail(), nil
		}}
}

// runConnect measures logins per second: under -C pgbench opens a new
// connection for every transaction, so tps is logins/s. A TOTP code in
// PGOPTIONS stays valid for at most about a minute (one step of skew), so
// on MFA paths long runs are cut into chunks of at most connectChunk, each
// with a fresh code, and the chunks' rates are averaged by their length.
func runConnect(ctx context.Context, e *env, ep *endpoint) (float64, map[string]float64, error) {
	const clients = 8
	args := []string{"-S", "-C", "-c", strconv.Itoa(clients), "-j", strconv.Itoa(threadsFor(clients))}
	total := max(1, int(e.cfg.Duration.Round(time.Second)/time.Second))
	chunk := total
	if ep.Code != nil {
		chunk = min(total, connectChunk)
	}
	var weighted, secs, txn float64
	for left := total; left > 0; left -= chunk {
		n := min(chunk, left)
		r, err := e.pgbenchFor(ctx, ep, n, args...)
		if err != nil {
			return 0, nil, err
		}
		weighted += r.TPS * float64(n)
		secs += float64(n)
		txn += float64(r.Transactions)
	}
	return weighted / secs, map[string]float64{"logins": txn}, nil
}

// connectChunk is the longest pgbench -C run with one TOTP code, seconds.
const connectChunk = 20
