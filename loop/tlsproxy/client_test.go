package tlsproxy_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

const mfaEnv = "PGOPTIONS=-c pgmfa.code=" + goodCode

func TestPsqlOverTLS(t *testing.T) {
	p := startProxy(t, setup{})
	k := certs(t)
	for _, sslmode := range []string{"sslmode=require", "sslmode=verify-full sslrootcert=" + k.CAFile} {
		t.Run(strings.Fields(sslmode)[0], func(t *testing.T) {
			out, err := p.psql("user=alice "+sslmode, []string{"PGPASSWORD=" + alicePW, mfaEnv},
				"select current_user || ' ' || 42")
			if err != nil || out != "alice 42" {
				t.Fatalf("psql: %v: %q", err, out)
			}
		})
	}
	line := p.waitLog(t, "msg=login", "result=ok")
	for _, want := range []string{"user=alice", "tls=true", "mfa=code", "method=scram-sha-256", "upstream_tls=false"} {
		if !strings.Contains(line, want) {
			t.Errorf("login line %q lacks %q", line, want)
		}
	}
	p.waitLog(t, `msg="session end"`, "mode=tls-relay", "reason=")
}

func TestPsqlWrongCodeOverTLS(t *testing.T) {
	p := startProxy(t, setup{})
	out, err := p.psql("user=alice sslmode=require", []string{"PGPASSWORD=" + alicePW, "PGOPTIONS=-c pgmfa.code=000000"}, "select 1")
	if err == nil || !strings.Contains(out, "MFA code for user \"alice\" is not valid") {
		t.Fatalf("want an MFA refusal, got %v: %q", err, out)
	}
	p.waitLog(t, "msg=login", "result=refused", "mfa_result=bad_code", "tls=true")
}

func TestPgxVerifyFull(t *testing.T) {
	p := startProxy(t, setup{})
	k := certs(t)
	ctx := context.Background()
	for _, extra := range []string{"", "sslnegotiation=direct"} {
		t.Run("negotiation="+extra, func(t *testing.T) {
			conn, err := pgx.ConnectConfig(ctx, p.pgxConfig(t, "sslmode=verify-full sslrootcert="+k.CAFile+" "+extra))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			if _, ok := conn.PgConn().Conn().(*tls.Conn); !ok {
				t.Fatalf("pgx connection is %T, not TLS", conn.PgConn().Conn())
			}
			var n int
			if err := conn.QueryRow(ctx, "select $1::int + 1", 41).Scan(&n); err != nil || n != 42 {
				t.Fatalf("query: %v, %d", err, n)
			}
		})
	}
}

func TestRequireRefusesPlaintext(t *testing.T) {
	p := startProxy(t, setup{mode: session.TLSRequire})
	_, err := pgx.ConnectConfig(context.Background(), p.pgxConfig(t, "sslmode=disable"))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "28000" || pe.Hint == "" || !strings.Contains(pe.Message, "encrypted") {
		t.Fatalf("want 28000 with a hint, got %v", err)
	}
	if p.dials.Load() != 0 {
		t.Fatal("a refused plaintext login reached the database")
	}
	// And TLS still works in require mode.
	out, err := p.psql("user=alice sslmode=require", []string{"PGPASSWORD=" + alicePW, mfaEnv}, "select 1")
	if err != nil || out != "1" {
		t.Fatalf("psql over TLS: %v: %q", err, out)
	}
}

// TestDirectTLS logs in with a direct TLS handshake (no SSLRequest), the
// StartupMessage and the password written by hand.
func TestDirectTLS(t *testing.T) {
	p := startProxy(t, setup{})
	k := certs(t)
	addr := fmt.Sprintf("127.0.0.1:%d", p.port)
	tc, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: k.Pool, ServerName: "localhost", NextProtos: []string{"postgresql"}})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if got := tc.ConnectionState().NegotiatedProtocol; got != "postgresql" {
		t.Fatalf("ALPN %q", got)
	}
	fe := pgproto3.NewFrontend(tc, tc)
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": "carol", "database": "postgres", "pgmfa.code": goodCode}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	untilReady(t, fe, func(m pgproto3.BackendMessage) {
		if _, ok := m.(*pgproto3.AuthenticationCleartextPassword); ok {
			fe.Send(&pgproto3.PasswordMessage{Password: carolPW})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	})
	fe.Send(&pgproto3.Query{String: "select 40 + 2"})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	var got string
	untilReady(t, fe, func(m pgproto3.BackendMessage) {
		if dr, ok := m.(*pgproto3.DataRow); ok {
			got = string(dr.Values[0])
		}
	})
	if got != "42" {
		t.Fatalf("query result %q", got)
	}
	fe.Send(&pgproto3.Terminate{})
	_ = fe.Flush()
}

func untilReady(t *testing.T, fe *pgproto3.Frontend, each func(pgproto3.BackendMessage)) {
	t.Helper()
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			t.Fatalf("server error: %s %s", m.Code, m.Message)
		case *pgproto3.ReadyForQuery:
			return
		}
		each(m)
	}
}

func TestDirectTLSWithoutALPNRefused(t *testing.T) {
	p := startProxy(t, setup{})
	k := certs(t)
	addr := fmt.Sprintf("127.0.0.1:%d", p.port)
	for name, protos := range map[string][]string{"no ALPN": nil, "other ALPN": {"h2"}} {
		t.Run(name, func(t *testing.T) {
			tc, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: k.Pool, ServerName: "localhost", NextProtos: protos})
			if err == nil {
				// A TLS 1.3 client may finish before the server's verdict;
				// then the first read must fail.
				_ = tc.SetDeadline(time.Now().Add(time.Minute))
				_, err = tc.Read(make([]byte, 1))
				tc.Close()
			}
			if err == nil {
				t.Fatal("a direct TLS connection without ALPN postgresql was accepted")
			}
			t.Logf("refused: %v", err)
		})
	}
	if p.dials.Load() != 0 {
		t.Fatal("the database was dialed")
	}
}

// TestSSLRequestWithTrailingBytes: a StartupMessage sent in the same write
// as the SSLRequest, before the handshake, must never be processed
// (CVE-2021-23214).
func TestSSLRequestWithTrailingBytes(t *testing.T) {
	pg := plain(t)
	logStart := len(pg.Log())
	p := startProxy(t, setup{})
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p.port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pkt := proto.Append(nil, &pgproto3.SSLRequest{}, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": "alice", "database": "postgres", "application_name": "cve-probe", "pgmfa.code": goodCode}})
	if _, err := c.Write(pkt); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(time.Minute))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("want the connection closed, got %v", err)
	}
	if len(got) != 0 {
		// Only possible if the two packets arrived in separate reads: then
		// 'S' and a handshake that fails on the plaintext.
		t.Logf("proxy answered %q before closing", got)
	}
	if n := p.dials.Load(); n != 0 {
		t.Fatalf("the database was dialed %d times", n)
	}
	// The log first: with log_statement=all the check below logs the name.
	if strings.Contains(pg.Log()[logStart:], "cve-probe") {
		t.Fatal("the server log mentions the probe")
	}
	if out, err := pg.Psql("select count(*) from pg_stat_activity where application_name = 'cve-probe'"); err != nil || out != "0" {
		t.Fatalf("pg_stat_activity: %v %q", err, out)
	}
}

func TestAuthPasswordNeedsTLS(t *testing.T) {
	p := startProxy(t, setup{auth: session.AuthPassword})
	env := []string{"PGPASSWORD=" + alicePW + goodCode}
	out, err := p.psql("user=alice sslmode=require", env, "select current_user")
	if err != nil || out != "alice" {
		t.Fatalf("password auth over TLS: %v: %q", err, out)
	}
	p.waitLog(t, "msg=login", "result=ok", "mfa=password", "tls=true")
	out, err = p.psql("user=alice sslmode=disable", env, "select current_user")
	if err == nil || !strings.Contains(out, "will not ask for a cleartext password over an unencrypted connection") {
		t.Fatalf("password auth over plaintext: %v: %q", err, out)
	}
}

func TestLargeResultOverTLS(t *testing.T) {
	p := startProxy(t, setup{})
	ctx := context.Background()
	conn, err := pgx.ConnectConfig(ctx, p.pgxConfig(t, "sslmode=require"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, "select i, repeat('x', 1000000) from generate_series(1, 50) i")
	if err != nil {
		t.Fatal(err)
	}
	want := strings.Repeat("x", 1000000)
	n := 0
	for rows.Next() {
		var i int
		var s string
		if err := rows.Scan(&i, &s); err != nil {
			t.Fatal(err)
		}
		n++
		if i != n || s != want {
			t.Fatalf("row %d: i=%d, %d bytes, intact=%v", n, i, len(s), s == want)
		}
	}
	if err := rows.Err(); err != nil || n != 50 {
		t.Fatalf("rows: %v after %d", err, n)
	}
	conn.Close(ctx)
	line := p.waitLog(t, `msg="session end"`)
	// Close sends Terminate, to which PostgreSQL closes its end: which of
	// the two closes the driver sees first is a race (flaked 2 in 8 runs),
	// and both are a clean end started by the client.
	clean := strings.Contains(line, "reason=\"client closed\"") || strings.Contains(line, "reason=\"database closed\"")
	if !strings.Contains(line, "bytes_server_to_client=5") || !clean {
		t.Errorf("session end should count the ~50 MB result and name a clean close: %s", line)
	}
}

// TestCancelOverTLS: the client sees its backend's real PID; pgx sends its
// CancelRequest with that key on a new connection (inside TLS, as libpq 17
// does, since the session is encrypted); the driver forwards it over its
// own upstream dialer, so with TLS when the database side uses TLS.
func TestCancelOverTLS(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pg      func(*testing.T) *pgcluster.Cluster
		upTLS   tlsproxy.UpstreamTLS
		sslmode string
	}{
		{"tls-client", plain, tlsproxy.UpstreamTLS{}, "sslmode=require"},
		// A plaintext client (a TLS client would trip the SCRAM channel
		// binding check over a TLS upstream) whose cancel pgmfa forwards
		// over TLS.
		{"tls-upstream", withSSL, tlsproxy.UpstreamTLS{SSLMode: tlsproxy.SSLRequire}, "sslmode=disable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pg := tc.pg(t)
			p := startProxy(t, setup{pg: pg, upTLS: tc.upTLS})
			ctx := context.Background()
			conn, err := pgx.ConnectConfig(ctx, p.pgxConfig(t, tc.sslmode))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			var pid uint32
			if err := conn.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid); err != nil {
				t.Fatal(err)
			}
			if got := conn.PgConn().PID(); got != pid {
				t.Fatalf("the client was given PID %d, its backend is %d", got, pid)
			}
			errc := make(chan error, 1)
			go func() {
				_, err := conn.Exec(ctx, "select pg_sleep(600)")
				errc <- err
			}()
			for i := 0; ; i++ {
				out, _ := pg.Psql(fmt.Sprintf("select count(*) from pg_stat_activity where pid = %d and state = 'active'", pid))
				if out == "1" {
					break
				}
				if i > 1000 {
					t.Fatal("the query never started")
				}
				time.Sleep(10 * time.Millisecond)
			}
			routed, dials := p.routed.Load(), p.dials.Load()
			if err := conn.PgConn().CancelRequest(ctx); err != nil {
				t.Fatal(err)
			}
			err = <-errc
			var pe *pgconn.PgError
			if !errors.As(err, &pe) || pe.Code != "57014" {
				t.Fatalf("want 57014 (canceled), got %v", err)
			}
			if p.routed.Load() != routed+1 || p.dials.Load() != dials+1 {
				t.Fatal("the cancel was not routed by the hook and forwarded over the upstream dialer")
			}
		})
	}
}

// TestHandoffFromLoop: the loop answered the SSLRequest (or saw a direct
// ClientHello) and hands over with StartTLS; the driver finishes the
// handshake, replaying what the loop read.
func TestHandoffFromLoop(t *testing.T) {
	p := startProxy(t, setup{asLoop: true})
	k := certs(t)
	ctx := context.Background()
	for _, extra := range []string{"sslmode=verify-full", "sslmode=verify-full sslnegotiation=direct"} {
		t.Run(extra, func(t *testing.T) {
			conn, err := pgx.ConnectConfig(ctx, p.pgxConfig(t, extra+" sslrootcert="+k.CAFile))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			var n int
			if err := conn.QueryRow(ctx, "select 7").Scan(&n); err != nil || n != 7 {
				t.Fatalf("query: %v %d", err, n)
			}
		})
	}
	out, err := p.psql("user=alice sslmode=require", []string{"PGPASSWORD=" + alicePW, mfaEnv}, "select 1")
	if err != nil || out != "1" {
		t.Fatalf("psql: %v: %q", err, out)
	}
}

// TestPipelinedQueryOverTLS: a query sent in the same write as the
// password is held until the release and then answered; when MFA fails it
// never reaches the database.
func TestPipelinedQueryOverTLS(t *testing.T) {
	pg := plain(t)
	p := startProxy(t, setup{})
	k := certs(t)
	for _, code := range []string{goodCode, "000000"} {
		t.Run("code="+code, func(t *testing.T) {
			logStart := len(pg.Log())
			probe := "pipelined-probe-" + code
			tc, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p.port), &tls.Config{RootCAs: k.Pool, ServerName: "localhost", NextProtos: []string{"postgresql"}})
			if err != nil {
				t.Fatal(err)
			}
			defer tc.Close()
			fe := pgproto3.NewFrontend(tc, tc)
			fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
				Parameters: map[string]string{"user": "carol", "database": "postgres", "pgmfa.code": code}})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
			if m, err := fe.Receive(); err != nil {
				t.Fatal(err)
			} else if _, ok := m.(*pgproto3.AuthenticationCleartextPassword); !ok {
				t.Fatalf("got %T", m)
			}
			fe.Send(&pgproto3.PasswordMessage{Password: carolPW})
			fe.Send(&pgproto3.Query{String: "select '" + probe + "'"})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
			var got string
			var refused *pgproto3.ErrorResponse
			for ready := 0; ready < 2 && refused == nil; {
				m, err := fe.Receive()
				if err != nil {
					t.Fatal(err)
				}
				switch m := m.(type) {
				case *pgproto3.ReadyForQuery:
					ready++
				case *pgproto3.DataRow:
					got = string(m.Values[0])
				case *pgproto3.ErrorResponse:
					refused = m
				}
			}
			if code == goodCode {
				if refused != nil || got != probe {
					t.Fatalf("pipelined query: %v %q", refused, got)
				}
				return
			}
			if refused == nil || refused.Code != "28000" {
				t.Fatalf("want 28000, got %v", refused)
			}
			if _, err := fe.Receive(); err == nil {
				t.Fatal("connection still open after the refusal")
			}
			if strings.Contains(pg.Log()[logStart:], probe) {
				t.Fatal("the pipelined query reached the database although MFA failed")
			}
		})
	}
}
