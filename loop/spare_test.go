package loop_test

import (
	"context"
	"regexp"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

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
	var at time.Time
	if err := c.QueryRow(ctx, "select backend_start from pg_stat_activity where pid = pg_backend_pid()").Scan(&at); err != nil {
		t.Fatal(err)
	}
	return at
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
	before := time.Now()
	if at := backendStart(t, spares); !at.Before(before) {
		t.Fatalf("the backend started at %s, after the client connected at %s: not a spare", at.Format(time.StampMicro), before.Format(time.StampMicro))
	}
	st := spares.srv.StatsSnapshot()
	if st["spares_used"] != 1 || st["spares_missed"] != 1 {
		t.Errorf("spares used %d, missed %d; want 1 and 1", st["spares_used"], st["spares_missed"])
	}
	if !regexp.MustCompile(`login timing.* spare=true`).MatchString(spares.logs.String()) {
		t.Error(`no "login timing" line says spare=true`)
	}

	before = time.Now()
	if at := backendStart(t, none); at.Before(before) {
		t.Fatalf("without spares the backend started at %s, before the client connected at %s", at.Format(time.StampMicro), before.Format(time.StampMicro))
	}
	if _, ok := none.srv.StatsSnapshot()["spares_used"]; ok {
		t.Error("a proxy without spares reports spare counters")
	}
}
