package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// sessionRSS measures the path's process memory per session: RSS before,
// RSS with -sessions sessions open, the difference divided by the sessions.
// waiting=false holds logged-in idle sessions (on pgmfa: spliced ones);
// waiting=true holds logins of bench_wait that never send a code, so pgmfa
// keeps them waiting for `pgmfa approve`. Those come from 127.0.0.2 so that
// no --mfa-remember entry for 127.0.0.1 can let them in.
//
// pgmfa paths measure a fresh pgmfa (same flags): a Go process that has just
// served a bulk workload hands memory back to the kernel for minutes, which
// drowns a few KiB per session (readings with the sessions open came out
// below the ones before). The fresh process's CPU is in the detail.
func (e *env) sessionRSS(ctx context.Context, ep *endpoint, waiting bool) (float64, map[string]float64, error) {
	if ep.Fresh != nil {
		f := ep.Fresh()
		if f.Cmd != nil {
			defer e.procs.stop(f.Cmd)
		}
		if f.Err != nil {
			return 0, nil, fmt.Errorf("fresh pgmfa: %w", f.Err)
		}
		// A few logins first, so one-time allocations of the first sessions
		// (buffers, maps, lazily started helpers) are not charged to all.
		for i := 0; i < 10; i++ {
			if c, err := connect(ctx, f, benchUser, true, nil, nil); err == nil {
				c.Close(context.Background())
			}
		}
		cpu0, _ := procCPU(f.PID())
		v, detail, err := e.sessionRSSOn(ctx, f, waiting)
		if cpu1, cerr := procCPU(f.PID()); cerr == nil && detail != nil {
			detail["fresh_proxy_cpu_seconds"] = cpu1 - cpu0
		}
		return v, detail, err
	}
	return e.sessionRSSOn(ctx, ep, waiting)
}

func (e *env) sessionRSSOn(ctx context.Context, ep *endpoint, waiting bool) (float64, map[string]float64, error) {
	pid := ep.PID()
	if pid == 0 {
		return 0, nil, errors.New("path has no process to measure")
	}
	defer func() {
		if ep.Drain != nil {
			if err := ep.Drain(ctx); err != nil {
				e.logf("%s: %v", ep.Name, err)
			}
		}
		e.waitBackendsGone(20*time.Second + time.Duration(e.cfg.Sessions)*2*time.Millisecond)
	}()
	// A Go proxy's runtime hands memory back to the kernel in the background
	// after a busy workload; a reading taken while that is under way can
	// exceed the one with the sessions open.
	before, err := settledRSS(pid, 10*time.Second)
	if err != nil {
		return 0, nil, err
	}
	n := e.cfg.Sessions
	var open int
	var after int64
	if waiting {
		open, after, err = e.holdWaiting(ctx, ep, pid, n)
	} else {
		open, after, err = e.holdIdle(ctx, ep, pid, n)
	}
	if err != nil {
		return 0, nil, err
	}
	return float64(after-before) / float64(open), map[string]float64{
		"rss_before_kib": float64(before), "rss_after_kib": float64(after), "sessions": float64(open)}, nil
}

// isSessionWorkload reports whether a workload holds -sessions sessions.
func isSessionWorkload(w string) bool { return w == "idle-rss" || w == "mfa-wait-rss" }

// holdIdle opens n logged-in sessions, reads the RSS and closes them.
func (e *env) holdIdle(ctx context.Context, ep *endpoint, pid, n int) (int, int64, error) {
	conns := make([]*pgconn.PgConn, n)
	var firstErr error
	retried := 0
	var mu sync.Mutex
	var wg sync.WaitGroup
	next := make(chan int)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				var c *pgconn.PgConn
				var err error
				// A login can time out on a machine busy enough (the
				// proxy's --handshake-timeout is 15 s); one of 10,000
				// must not throw away the minutes spent on the others.
				for try := 0; try < 3 && ctx.Err() == nil; try++ {
					cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
					c, err = connect(cctx, ep, benchUser, true, nil, nil)
					cancel()
					if err == nil {
						break
					}
					mu.Lock()
					retried++
					mu.Unlock()
				}
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = fmt.Errorf("session %d of %d (3 tries): %w", i+1, n, err)
				}
				conns[i] = c
				mu.Unlock()
			}
		}()
	}
	progress := time.Now()
	for i := 0; i < n && ctx.Err() == nil; i++ {
		if i%100 == 0 {
			if avail := memAvailableKB(); avail >= 0 && avail < minMemAvailableKB {
				mu.Lock()
				if firstErr == nil {
					firstErr = errLowMemory(i, n)
				}
				mu.Unlock()
				break
			}
			if time.Since(progress) > 30*time.Second {
				e.logf("%s: idle-rss: %d of %d sessions open", ep.Name, i, n)
				progress = time.Now()
			}
		}
		next <- i
	}
	close(next)
	wg.Wait()
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close(context.Background())
			}
		}
	}()
	if firstErr != nil {
		return 0, 0, firstErr
	}
	if err := ctx.Err(); err != nil {
		return 0, 0, err
	}
	if retried > 0 {
		e.logf("%s: idle-rss: %d logins failed and were tried again", ep.Name, retried)
	}
	rss, err := settledRSS(pid, 5*time.Second)
	return n, rss, err
}

// loginsInFlight bounds the waiting logins holdWaiting has started that
// are not waiting yet (their database backend is not there). Started all
// at once, thousands of logins queue behind each other's SCRAM and backend
// start-up, and the ones at the back run into the proxy's
// --handshake-timeout (15 s) or PostgreSQL's authentication_timeout (60 s)
// before they ever wait.
const loginsInFlight = 32

// holdWaiting starts n logins that send no code and, once they all wait
// (their upstream backends exist, or the proxy's RSS stopped growing),
// reads the RSS and abandons them. Logins are started as earlier ones
// reach the wait (at most loginsInFlight on their way); a proxy whose
// waiting logins leave no backend to count gets the rest 1 ms apart once
// the count has not moved for 10 s.
func (e *env) holdWaiting(ctx context.Context, ep *endpoint, pid, n int) (int, int64, error) {
	cctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var mu sync.Mutex
	returned, admitted := 0, 0
	var firstErr error
	local := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}
	start := func() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := connect(cctx, ep, benchWaitUser, false, nil, local)
			if cctx.Err() != nil {
				if c != nil {
					c.Close(context.Background())
				}
				return // abandoned by us: the expected end
			}
			mu.Lock()
			defer mu.Unlock()
			returned++
			if err == nil {
				admitted++
				c.Close(context.Background())
			} else if firstErr == nil {
				firstErr = err
			}
		}()
		time.Sleep(time.Millisecond) // a login storm of n at once measures the backlog, not sessions
	}
	defer func() { cancel(); wg.Wait() }()

	started, paced := 0, true
	waiting, moved, logged := 0, time.Now(), time.Now()
	var last int64
	stable := 0
	for ctx.Err() == nil {
		mu.Lock()
		r := returned
		mu.Unlock()
		if r == n {
			break
		}
		if b := e.backends(benchWaitUser); b > waiting {
			waiting, moved = b, time.Now()
		}
		if waiting >= n {
			break
		}
		if avail := memAvailableKB(); avail >= 0 && avail < minMemAvailableKB {
			return 0, 0, errLowMemory(waiting, n)
		}
		if paced && time.Since(moved) > 10*time.Second {
			paced = false
		}
		room := n - started
		if paced {
			room = min(room, waiting+r+loginsInFlight-started)
		}
		for ; room > 0; room-- {
			start()
			started++
		}
		if time.Since(logged) > 30*time.Second {
			e.logf("%s: mfa-wait-rss: %d of %d logins waiting", ep.Name, waiting, n)
			logged = time.Now()
		}
		time.Sleep(250 * time.Millisecond)
		if started < n {
			continue
		}
		if time.Since(moved) > 60*time.Second {
			break // no login reached the wait for a minute: read what is there
		}
		// A proxy that waits for MFA before dialing upstream leaves no
		// backend to count: settle on the RSS instead.
		rss, _ := procRSSKB(pid)
		if rss == last {
			stable++
		} else {
			stable = 0
		}
		last = rss
		if stable >= 8 && waiting == 0 {
			break
		}
	}
	rss, err := procRSSKB(pid)
	if err != nil {
		return 0, 0, err
	}
	mu.Lock()
	defer mu.Unlock()
	if admitted > 0 {
		return 0, 0, fmt.Errorf("%d of %d logins without a code were let in: MFA did not wait", admitted, n)
	}
	if returned == n && firstErr != nil {
		return 0, 0, fmt.Errorf("every login without a code ended instead of waiting: %w", firstErr)
	}
	if returned > 0 && firstErr != nil {
		// Logins that ended did not wait: the figure would be per fewer
		// sessions than asked for, and the reason is worth seeing.
		e.logf("%s: mfa-wait-rss: %d of %d logins ended instead of waiting, first: %v", ep.Name, returned, n, firstErr)
	}
	if err := ctx.Err(); err != nil {
		return 0, 0, err
	}
	return started - returned, rss, nil
}

// settledRSS waits (at most max) until the RSS of pid changes by at most
// 64 KiB over a second, and returns it.
func settledRSS(pid int, max time.Duration) (int64, error) {
	deadline := time.Now().Add(max)
	prev, err := procRSSKB(pid)
	for err == nil {
		time.Sleep(time.Second)
		var cur int64
		if cur, err = procRSSKB(pid); err != nil {
			break
		}
		d := cur - prev
		if d < 0 {
			d = -d
		}
		if d <= 64 || time.Now().After(deadline) {
			return cur, nil
		}
		prev = cur
	}
	return 0, err
}

// backends counts the database sessions of a user (-1 when unknown).
func (e *env) backends(user string) int {
	out, err := e.cluster.Psql("SELECT count(*) FROM pg_stat_activity WHERE usename = '" + user + "'")
	if err != nil {
		return -1
	}
	n, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		return -1
	}
	return n
}

// waitBackendsGone waits (bounded) for the sessions a workload left behind
// to close, so they neither count against max_connections nor load the next
// measurement. pgbouncer keeps its pool until server_idle_timeout.
func (e *env) waitBackendsGone(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if e.backends(benchUser)+e.backends(benchWaitUser) <= leftoverBackends {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// leftoverBackends is how many bench sessions may stay around between
// workloads (pools of earlier pgbench runs) without being waited for.
const leftoverBackends = 100
