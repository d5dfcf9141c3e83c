package loop_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/mfa"
)

// backendStart logs in through the proxy and returns when the database
// started the session's backend (pg_stat_activity.backend_start: when the
// postmaster forked it).
func backendStart(t *testing.T, p *proxy) time.Time {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, p.dsn(svc, svcPW, "app", ""))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	return backendStartOf(ctx, t, c)
}

// backendStartOf is when the database started c's backend.
func backendStartOf(ctx context.Context, t *testing.T, c *pgx.Conn) time.Time {
	t.Helper()
	var at time.Time
	if err := c.QueryRow(ctx, "select backend_start from pg_stat_activity where pid = pg_backend_pid()").Scan(&at); err != nil {
		t.Fatal(err)
	}
	return at
}

// waitForkedSpare waits until the database has a backend waiting for its
// StartupMessage — a spare's: a child of the postmaster still under the
// postmaster's own command line (a backend retitles itself for ps once it
// has its StartupMessage), asleep (in its read; a child that has not run
// yet is runnable and has not stamped its backend_start). The spare's
// socket is connected before any of that (the kernel completes the
// handshake), and under load the postmaster forks it, and the child first
// runs, milliseconds later.
func waitForkedSpare(t *testing.T, pg *pgcluster.Cluster) {
	t.Helper()
	pm := pg.PID()
	title, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pm))
	if err != nil {
		t.Fatal(err)
	}
	forked := func() bool {
		for _, child := range pgcluster.Children(pm) {
			stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", child))
			if err != nil {
				continue
			}
			// pid (comm) state …: comm may hold spaces, so split after ')'.
			f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
			if len(f) < 1 || f[0] != "S" {
				continue
			}
			if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", child)); err == nil && bytes.Equal(cmd, title) {
				return true
			}
		}
		return false
	}
	if !eventually(20*time.Second, forked) {
		t.Fatal("the database forked no backend for the spare within 20 s")
	}
}

// connectOnSpare logs in through p, which holds a spare, once the spare's
// backend runs, and fails the test unless the session's backend started
// before the client connected: the login ran on the spare. The caller
// closes the connection.
func connectOnSpare(ctx context.Context, t *testing.T, p *proxy, dsn string) *pgx.Conn {
	t.Helper()
	waitForkedSpare(t, p.pg)
	before := time.Now()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	if at := backendStartOf(ctx, t, c); !at.Before(before) {
		c.Close(ctx)
		t.Fatalf("the backend started at %s, after the client connected at %s: not a spare", at.Format(time.StampMicro), before.Format(time.StampMicro))
	}
	return c
}

// With --spare-conns, a login gets a backend the database forked before
// the client connected, opened when the previous login took a spare;
// without, one forked after.
func TestLoginGetsASpareBackend(t *testing.T) {
	spares := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Spares = 1 })
	none := startProxy(t, mfa.Options{}, nil)

	backendStart(t, spares) // the first login finds none and starts one
	if !eventually(10*time.Second, func() bool { return spares.srv.StatsSnapshot()["spares_held"] == 1 }) {
		t.Fatalf("no spare was opened after a login: %v", spares.srv.StatsSnapshot())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	connectOnSpare(ctx, t, spares, spares.dsn(svc, svcPW, "app", "")).Close(ctx)
	st := spares.srv.StatsSnapshot()
	if st["spares_used"] != 1 || st["spares_missed"] != 1 {
		t.Errorf("spares used %d, missed %d; want 1 and 1", st["spares_used"], st["spares_missed"])
	}
	if !regexp.MustCompile(`login timing.* spare=true`).MatchString(spares.logs.String()) {
		t.Error(`no "login timing" line says spare=true`)
	}

	before := time.Now()
	if at := backendStart(t, none); at.Before(before) {
		t.Fatalf("without spares the backend started at %s, before the client connected at %s", at.Format(time.StampMicro), before.Format(time.StampMicro))
	}
	if _, ok := none.srv.StatsSnapshot()["spares_used"]; ok {
		t.Error("a proxy without spares reports spare counters")
	}
}
