package loop_test

import (
	"context"
	"errors"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

// countingConn counts the bytes a client really read and wrote.
type countingConn struct {
	net.Conn
	read, written *atomic.Uint64
}

func (c countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.read.Add(uint64(n))
	return n, err
}

func (c countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.written.Add(uint64(n))
	return n, err
}

// countedConn is a pgx connection whose socket bytes are counted.
type countedConn struct {
	*pgx.Conn
	read, written atomic.Uint64
}

func connectCounted(t *testing.T, dsn string) *countedConn {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cc := &countedConn{}
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return countingConn{nc, &cc.read, &cc.written}, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if cc.Conn, err = pgx.ConnectConfig(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close(context.Background()) })
	return cc
}

// onlySession returns the one live session of the proxy.
func onlySession(t *testing.T, p *proxy) loop.SessionInfo {
	t.Helper()
	var ss []loop.SessionInfo
	if !eventually(10*time.Second, func() bool { ss = p.srv.Sessions(); return len(ss) == 1 }) {
		t.Fatalf("want one live session, have %+v", ss)
	}
	return ss[0]
}

// settled returns the one live session once its counts stay the same for
// a while.
func settled(t *testing.T, p *proxy) loop.SessionInfo {
	t.Helper()
	prev := onlySession(t, p)
	for range 100 {
		time.Sleep(100 * time.Millisecond)
		cur := onlySession(t, p)
		if cur == prev {
			return cur
		}
		prev = cur
	}
	t.Fatalf("the session's counts never settled: %+v", prev)
	return prev
}

// TestLiveSessions: Server.Sessions lists a handed-off session with its
// user, database, client and mode, and byte counts — for a spliced session
// the kernel's — that grow while a result streams and, once the session is
// idle, moved exactly what the client's socket read and wrote since.
// EndSession ends it and its database backend, even one running a query;
// an unknown id changes nothing.
func TestLiveSessions(t *testing.T) {
	pg := cluster(t)
	for _, mode := range spliceModes(t) {
		t.Run(mode, func(t *testing.T) {
			p := startProxy(t, mfa.Options{Remember: time.Hour}, func(c *loop.Config) { c.Splice = mode })
			cc := connectCounted(t, p.dsn(alice, alicePW, "app", p.code(alice)))
			ctx := context.Background()
			var pid int
			if err := cc.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid); err != nil {
				t.Fatal(err)
			}
			s0 := settled(t, p)
			wantMode := map[string]string{loop.SpliceSockmap: "sockmap", loop.SpliceOff: "relay"}[mode]
			if s0.User != alice || s0.Database != "app" || s0.Mode != wantMode || s0.Client != cc.PgConn().Conn().LocalAddr().String() {
				t.Fatalf("session %+v; want user %s, database app, mode %s, client %s", s0, alice, wantMode, cc.PgConn().Conn().LocalAddr())
			}
			r0, w0 := cc.read.Load(), cc.written.Load()

			// 32 MB of rows, of which the client reads one and then waits:
			// the counts must move while the rest is still on its way.
			rows, err := cc.Query(ctx, "select repeat('x', 1024*1024) from generate_series(1, 32)")
			if err != nil {
				t.Fatal(err)
			}
			if !rows.Next() {
				t.Fatalf("no row: %v", rows.Err())
			}
			var mid loop.SessionInfo
			if !eventually(10*time.Second, func() bool {
				mid = onlySession(t, p)
				return mid.ServerToClient > s0.ServerToClient+1<<20
			}) {
				t.Fatalf("counts did not grow while the result streamed: before %+v, now %+v", s0, mid)
			}
			n := 1
			for rows.Next() {
				n++
			}
			if err := rows.Err(); err != nil || n != 32 {
				t.Fatalf("read %d rows: %v", n, err)
			}
			// The counter of a write the client has already read can lag
			// for a moment (the carrier's goroutine between its write and
			// its count); an idle session's counts settle on the truth.
			s1 := settled(t, p)
			gotS2C, gotC2S := s1.ServerToClient-s0.ServerToClient, s1.ClientToServer-s0.ClientToServer
			wantS2C, wantC2S := cc.read.Load()-r0, cc.written.Load()-w0
			if gotS2C != wantS2C || gotC2S != wantC2S {
				t.Fatalf("session counted %d bytes to the client and %d to the database; the client read %d and wrote %d", gotS2C, gotC2S, wantS2C, wantC2S)
			}
			if mid.ServerToClient >= s1.ServerToClient {
				t.Fatalf("mid-stream count %d is not below the final %d", mid.ServerToClient, s1.ServerToClient)
			}
			t.Logf("%s: %d bytes to the client, %d to the database, counted live", mode, gotS2C, gotC2S)

			// An unknown id: an error, and the session goes on.
			if _, err := p.srv.EndSession(s1.ID+1000, 5*time.Second); !errors.Is(err, loop.ErrNoSession) {
				t.Fatalf("EndSession of an unknown id: %v", err)
			}
			var one int
			if err := cc.QueryRow(ctx, "select 1").Scan(&one); err != nil {
				t.Fatalf("session disturbed by the unknown id: %v", err)
			}

			// End a second session while its backend sleeps in a query. Its
			// client is psql, which (unlike pgx) sends no CancelRequest of
			// its own when the connection breaks: the backend is ended by
			// the proxy alone.
			sleeping := make(chan error, 1)
			go func() {
				_, stderr, err := p.psql(alice, alicePW, "", "select pg_sleep(120)")
				if err == nil {
					err = errors.New("psql succeeded: " + stderr)
				}
				sleeping <- err
			}()
			var sleeper string
			if !eventually(20*time.Second, func() bool {
				sleeper, _ = pg.Psql("select pid from pg_stat_activity where state = 'active' and query = 'select pg_sleep(120)'")
				return sleeper != ""
			}) {
				t.Fatal("the second session's backend never started its query")
			}
			var second loop.SessionInfo
			for _, si := range p.srv.Sessions() {
				if si.ID != s1.ID {
					second = si
				}
			}
			if second.ID == 0 {
				t.Fatalf("the second session is not listed: %+v", p.srv.Sessions())
			}
			for _, id := range []uint64{second.ID, s1.ID} {
				if ended, err := p.srv.EndSession(id, 10*time.Second); err != nil || ended.ID != id {
					t.Fatalf("EndSession(%d): %+v, %v", id, ended, err)
				}
			}
			select {
			case err := <-sleeping:
				t.Logf("psql: %v", err)
			case <-time.After(20 * time.Second):
				t.Fatal("psql's query is still running after the kill")
			}
			if err := cc.QueryRow(ctx, "select 1").Scan(&one); err == nil {
				t.Fatal("a query succeeded on a killed session")
			}
			for _, b := range []string{sleeper, strconv.Itoa(pid)} {
				if !eventually(20*time.Second, func() bool {
					out, err := pg.Psql("select count(*) from pg_stat_activity where pid = " + b)
					return err == nil && out == "0"
				}) {
					t.Fatalf("backend %s is still in pg_stat_activity", b)
				}
			}
			if ss := p.srv.Sessions(); len(ss) != 0 {
				t.Fatalf("still listed: %+v", ss)
			}
			ends := sessionEnds(p.logs.String())
			if len(ends) != 2 || ends[0]["reason"] != loop.ReasonKilled || ends[1]["reason"] != loop.ReasonKilled {
				t.Fatalf("session-end lines %v; want two with reason %q", ends, loop.ReasonKilled)
			}
		})
	}
}

// TestTLSSessionsAndDrain: a TLS session is listed (mode tls-relay) with
// live counts and ended by EndSession; Drain refuses a TLS login waiting
// for approval with 57P01 and a HINT, over TLS, and cuts an open TLS
// session at its timeout.
func TestTLSSessionsAndDrain(t *testing.T) {
	pki := testPKI(t)
	certs, err := tlsproxy.LoadCerts(pki.CertFile, pki.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) {
		c.TLSCerts, c.TLSMode = certs, session.TLSRequire
		c.MFATimeout = time.Minute
	})
	dsn := func(user, pw string) string {
		return "postgres://" + user + ":" + pw + "@localhost:" + strconv.Itoa(p.port) + "/app?sslmode=verify-full&sslrootcert=" + pki.CAFile
	}
	ctx := context.Background()
	connect := func() *pgx.Conn {
		c, err := pgx.Connect(ctx, dsn(svc, svcPW))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(ctx) })
		return c
	}
	killed := connect()
	s0 := onlySession(t, p)
	if s0.Mode != "tls-relay" || s0.User != svc {
		t.Fatalf("TLS session listed as %+v", s0)
	}
	var n int
	if err := killed.QueryRow(ctx, "select length(repeat('x', 1024*1024))").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if err := killed.QueryRow(ctx, "select length(string_agg(repeat('y', 1024), '')) from generate_series(1, 1024)").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if s1 := onlySession(t, p); s1.ServerToClient <= s0.ServerToClient || s1.ClientToServer <= s0.ClientToServer {
		t.Fatalf("counts did not grow: %+v then %+v", s0, s1)
	}
	if _, err := p.srv.EndSession(s0.ID, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := killed.QueryRow(ctx, "select 1").Scan(&n); err == nil {
		t.Fatal("a query succeeded on a killed TLS session")
	}

	open := connect()
	waiting := make(chan error, 1)
	go func() {
		c, err := pgx.Connect(ctx, dsn(alice, alicePW)) // no code: waits for approval
		if err == nil {
			c.Close(ctx)
		}
		waiting <- err
	}()
	if !eventually(20*time.Second, func() bool { return strings.Contains(p.logs.String(), "login waiting for MFA approval") }) {
		t.Fatal("the TLS login never waited for approval")
	}
	res := p.srv.Drain(2 * time.Second)
	// Logins in flight: the waiting one, and possibly the CancelRequest
	// pgx sends when the killed session's connection broke (it is a
	// connection in flight until the database closes the forwarded one).
	if res.Logins < 1 || res.Sessions != 1 || res.RefusedLogins != 1 || len(res.Cut) != 1 || res.Cut[0].Mode != "tls-relay" {
		t.Fatalf("drain: %+v", res)
	}
	select {
	case err := <-waiting:
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "57P01" || !strings.Contains(pe.Hint, "--drain-timeout") {
			t.Fatalf("the waiting TLS login got %v; want 57P01 with a HINT", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the waiting TLS login was not refused")
	}
	if err := open.QueryRow(ctx, "select 1").Scan(&n); err == nil {
		t.Fatal("the TLS session survived the drain timeout")
	}
}
