package loop_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
)

// rawClient speaks the protocol by hand so tests can misbehave.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	buf  []byte
}

func dialRaw(t *testing.T, p *proxy) *rawClient {
	t.Helper()
	c, err := net.DialTimeout("tcp", net.JoinHostPort(p.host, strconv.Itoa(p.port)), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return &rawClient{t: t, conn: c}
}

func (r *rawClient) write(b []byte) {
	r.t.Helper()
	if _, err := r.conn.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// next reads one server message (nil, io.EOF when the proxy closed).
func (r *rawClient) next() (pgproto3.BackendMessage, error) {
	for {
		m, n, err := proto.NextMessage(r.buf, 1<<30)
		if err != nil {
			return nil, err
		}
		if n > 0 {
			r.buf = r.buf[n:]
			return proto.DecodeBackend(m)
		}
		tmp := make([]byte, 64<<10)
		k, err := r.conn.Read(tmp)
		r.buf = append(r.buf, tmp[:k]...)
		if err != nil && k == 0 {
			return nil, err
		}
	}
}

// nextRaw reads one message, decoded or not (for DataRow and friends).
func (r *rawClient) nextRaw() (proto.Message, error) {
	for {
		m, n, err := proto.NextMessage(r.buf, 1<<30)
		if err != nil {
			return proto.Message{}, err
		}
		if n > 0 {
			m.Body = append([]byte(nil), m.Body...)
			r.buf = r.buf[n:]
			return m, nil
		}
		tmp := make([]byte, 64<<10)
		k, err := r.conn.Read(tmp)
		r.buf = append(r.buf, tmp[:k]...)
		if err != nil && k == 0 {
			return proto.Message{}, err
		}
	}
}

// expectRefusal reads until an ErrorResponse or EOF and returns the error
// (nil when the proxy just closed).
func (r *rawClient) expectRefusal() *pgproto3.ErrorResponse {
	r.t.Helper()
	for {
		m, err := r.next()
		if err != nil {
			return nil
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			return m
		case *pgproto3.AuthenticationOk:
			r.t.Fatal("the client received AuthenticationOk")
		}
	}
}

func startup(user, db, code string) []byte {
	params := map[string]string{"user": user, "database": db}
	if code != "" {
		params["options"] = "-c pgmfa.code=" + code
	}
	return proto.Append(nil, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: params})
}

// pgLogHas reports whether the database's log mentions marker (every
// statement it received is logged: log_statement=all).
func pgLogHas(p *proxy, marker string) bool {
	return strings.Contains(p.pg.Log(), marker)
}

func marker(t *testing.T) string {
	b := make([]byte, 6)
	rand.Read(b)
	return fmt.Sprintf("pgmfa_marker_%x", b)
}

// TestQueryBeforeAuthIsRejected: a client that answers the password
// request with a Query (or Parse) is refused and the database never sees it.
func TestQueryBeforeAuthIsRejected(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	for _, msg := range []pgproto3.FrontendMessage{
		&pgproto3.Query{String: "select '%s'"},
		&pgproto3.Parse{Query: "select '%s'"},
	} {
		mk := marker(t)
		switch m := msg.(type) {
		case *pgproto3.Query:
			m.String = fmt.Sprintf(m.String, mk)
		case *pgproto3.Parse:
			m.Query = fmt.Sprintf(m.Query, mk)
		}
		c := dialRaw(t, p)
		c.write(startup(alice, "app", p.code(alice)))
		m, err := c.next()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := m.(*pgproto3.AuthenticationSASL); !ok {
			t.Fatalf("want AuthenticationSASL first, got %T", m)
		}
		c.write(proto.Append(nil, msg, &pgproto3.Sync{}))
		e := c.expectRefusal()
		if e == nil || (e.Code != "08P01" && e.Code != "28000") {
			t.Fatalf("%T before auth: want 08P01/28000, got %+v", msg, e)
		}
		time.Sleep(200 * time.Millisecond)
		if pgLogHas(p, mk) {
			t.Fatalf("%T sent before authentication reached the database", msg)
		}
	}
}

// scramLogin drives the SCRAM exchange through the proxy by hand with the
// proxy's own client machine, and calls last with the final SASL response
// so the caller can send it together with whatever it wants to pipeline.
func scramLogin(t *testing.T, c *rawClient, user, pw, code string, last func(final []byte)) {
	t.Helper()
	up := proto.NewUpstreamLogin(proto.UpstreamConfig{User: user, Password: pw, Database: "app", Rand: rand.Reader})
	c.write(startup(user, "app", code))
	for {
		m, err := c.next()
		if err != nil {
			t.Fatalf("login: %v", err)
		}
		out, _, err := up.Handle(m)
		if err != nil {
			t.Fatalf("login: %v", err)
		}
		if _, ok := m.(*pgproto3.AuthenticationSASLContinue); ok {
			last(out)
			return
		}
		if len(out) > 0 {
			c.write(out)
		}
	}
}

// TestPipelinedQueryWaitsForMFA: a query pipelined in the same segment as
// the last auth message is never forwarded when MFA fails, and is answered
// after the release when MFA passes.
func TestPipelinedQueryWaitsForMFA(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)

	// Wrong code: refused, the database never sees the query.
	mk := marker(t)
	c := dialRaw(t, p)
	wrong := "000000"
	if wrong == p.code(alice) {
		wrong = "111111"
	}
	scramLogin(t, c, alice, alicePW, wrong, func(final []byte) {
		c.write(append(final, proto.Append(nil, &pgproto3.Query{String: "select '" + mk + "'"})...))
	})
	var sawFinal bool
	for {
		m, err := c.next()
		if err != nil {
			t.Fatal("closed without an error")
		}
		if _, ok := m.(*pgproto3.AuthenticationSASLFinal); ok {
			sawFinal = true
			continue
		}
		if _, ok := m.(*pgproto3.AuthenticationOk); ok {
			t.Fatal("AuthenticationOk before MFA passed")
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			if e.Code != "28000" {
				t.Fatalf("want 28000, got %+v", e)
			}
			break
		}
	}
	if !sawFinal {
		t.Fatal("no SASLFinal relayed")
	}
	time.Sleep(200 * time.Millisecond)
	if pgLogHas(p, mk) {
		t.Fatal("a query pipelined behind the login reached the database although MFA failed")
	}

	// Right code: the pipelined query is answered after the release.
	mk = marker(t)
	c = dialRaw(t, p)
	scramLogin(t, c, alice, alicePW, p.code(alice), func(final []byte) {
		c.write(append(final, proto.Append(nil, &pgproto3.Query{String: "select '" + mk + "'"})...))
	})
	var gotRow, gotOk bool
	for !gotRow {
		m, err := c.nextRaw()
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		switch m.Type {
		case 'R':
			if len(m.Body) >= 4 && binary.BigEndian.Uint32(m.Body) == 0 {
				gotOk = true
			}
		case 'D':
			if !gotOk {
				t.Fatal("DataRow before AuthenticationOk")
			}
			if !bytes.Contains(m.Body, []byte(mk)) {
				t.Fatalf("DataRow %q does not carry the marker", m.Body)
			}
			gotRow = true
		case 'E':
			t.Fatalf("error: %q", m.Body)
		}
	}
}

// TestCancelRequest: the client holds its backend's own key; a
// CancelRequest through the proxy with it cancels a running pg_sleep; keys
// of no session here are forwarded (the database checks them) within a
// rate limit per source address.
func TestCancelRequest(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, p.dsn(svc, svcPW, "app", ""))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var backendPID uint32
	if err := conn.QueryRow(ctx, "select pg_backend_pid()").Scan(&backendPID); err != nil {
		t.Fatal(err)
	}
	if got := conn.PgConn().PID(); got != backendPID {
		t.Fatalf("the client was given PID %d; pg_backend_pid() is %d", got, backendPID)
	}
	go func() {
		time.Sleep(500 * time.Millisecond)
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := conn.PgConn().CancelRequest(cctx); err != nil {
			t.Errorf("cancel request: %v", err)
		}
	}()
	start := time.Now()
	_, err = conn.Exec(ctx, "select pg_sleep(30)")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57014" {
		t.Fatalf("want 57014 query_canceled, got %v after %v", err, time.Since(start))
	}
	// A made-up key cancels nothing and does not hurt; the proxy closes
	// without answering, as PostgreSQL does.
	raw := dialRaw(t, p)
	raw.write(proto.Append(nil, &pgproto3.CancelRequest{ProcessID: 1234, SecretKey: []byte{1, 2, 3, 4}}))
	if _, err := raw.next(); err == nil {
		t.Fatal("the proxy answered a cancel request")
	}
	// Guessing from one address: past the burst the proxy stops
	// forwarding (and says so once in its log).
	for i := 0; i < 25; i++ {
		raw := dialRaw(t, p)
		raw.write(proto.Append(nil, &pgproto3.CancelRequest{ProcessID: backendPID, SecretKey: []byte{byte(i), 0, 0, 1}}))
		if _, err := raw.next(); err == nil {
			t.Fatal("the proxy answered a cancel request")
		}
	}
	if !eventually(5*time.Second, func() bool { return strings.Contains(p.logs.String(), "rate limit per source address reached") }) {
		t.Fatal("25 unknown keys from one address were all forwarded")
	}
	// The session is unharmed.
	var one int
	if err := conn.QueryRow(ctx, "select 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("session after the guesses: %v", err)
	}
}

// TestManyLoginsAndSlowLoris: 200 concurrent logins succeed while two
// clients stall: one never finishes its startup packet (the startup
// timeout closes it), one sends its StartupMessage and never answers the
// authentication request (the handshake timeout closes it). Which timeout
// ended each is read from what the client receives and from the proxy's
// login line, never from a clock.
func TestManyLoginsAndSlowLoris(t *testing.T) {
	p := startProxy(t, mfa.Options{Remember: time.Minute}, func(c *loop.Config) {
		// 200 SCRAM logins at once on two loaded cores can take several
		// seconds each: both timeouts leave them room (the stalled
		// clients' refusals come after these, whatever the load).
		c.StartupTimeout = 10 * time.Second
		c.HandshakeTimeout = 30 * time.Second
	})
	// The refusal a login timeout sends (proto/session Machine.Timeout).
	refusedInTime := func(r *rawClient) <-chan *pgproto3.ErrorResponse {
		// The read deadline only keeps a broken proxy from hanging the
		// test; nothing is asserted about when the refusal comes.
		_ = r.conn.SetDeadline(time.Now().Add(5 * time.Minute))
		done := make(chan *pgproto3.ErrorResponse, 1)
		go func() { done <- r.expectRefusal() }()
		return done
	}
	loris := dialRaw(t, p)
	full := startup(alice, "app", "")
	loris.write(full[:len(full)/2])
	lorisDone := refusedInTime(loris)
	stalled := dialRaw(t, p)
	stalled.write(full)
	if m, err := stalled.next(); err != nil {
		t.Fatalf("no authentication request: %v", err)
	} else if _, ok := m.(*pgproto3.AuthenticationSASL); !ok {
		t.Fatalf("got %T, want AuthenticationSASL", m)
	}
	stalledDone := refusedInTime(stalled)

	// Prime --mfa-remember with one code, as a pool would.
	conn, err := pgx.Connect(context.Background(), p.dsn(alice, alicePW, "app", p.code(alice)))
	if err != nil {
		t.Fatal(err)
	}
	conn.Close(context.Background())

	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	conns := make(chan *pgx.Conn, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			c, err := pgx.Connect(ctx, p.dsn(alice, alicePW, "app", ""))
			if err != nil {
				errs <- err
				return
			}
			var one int
			if err := c.QueryRow(ctx, "select 1").Scan(&one); err != nil {
				errs <- err
			}
			conns <- c
		}()
	}
	wg.Wait()
	close(errs)
	close(conns)
	failed := 0
	for err := range errs {
		failed++
		if failed < 5 {
			t.Errorf("login failed: %v", err)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d concurrent logins failed", failed, n)
	}
	for c := range conns {
		c.Close(context.Background())
	}
	for _, c := range []struct {
		name string
		r    *rawClient
		e    *pgproto3.ErrorResponse
	}{{"half a startup packet", loris, <-lorisDone}, {"no answer to the authentication request", stalled, <-stalledDone}} {
		if c.e == nil || c.e.Code != proto.CodeProtocolViolation || c.e.Message != "login did not complete in time" {
			t.Errorf("%s: want 08P01 \"login did not complete in time\", got %+v", c.name, c.e)
		}
		if _, err := c.r.next(); err == nil {
			t.Errorf("%s: the connection stayed open after the refusal", c.name)
		}
	}
	// The stalled login was past its StartupMessage (it received the SASL
	// request, and its login line names the method), where the only timer
	// is the handshake timeout (loop/conn.go, once the StartupMessage is
	// in). The half packet named no user, so it has no login line.
	addr := stalled.conn.LocalAddr().String()
	var line string
	for _, l := range strings.Split(p.logs.String(), "\n") {
		if strings.Contains(l, `msg=login`) && strings.Contains(l, "client="+addr+" ") {
			line = l
		}
	}
	if !strings.Contains(line, "result=refused") || !strings.Contains(line, "method=scram-sha-256") ||
		!strings.Contains(line, `error="08P01: login did not complete in time"`) {
		t.Fatalf("the stalled login's line should show a refused SCRAM login that timed out: %q\n%s", line, p.logs.String())
	}
}

// TestGarbageAtEveryState: hostile bytes at each pre-auth state get a FATAL
// ErrorResponse with a real SQLSTATE, then a close (PostgreSQL closes
// silently on a bad startup length; the proxy says why); only a client's
// own Terminate is answered by a close alone, as PostgreSQL does. The proxy
// keeps serving.
func TestGarbageAtEveryState(t *testing.T) {
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.MaxMessageLen = 64 << 10 })
	bigLen := func(n uint32) []byte { b := make([]byte, 8); binary.BigEndian.PutUint32(b, n); return b }
	cases := []struct {
		name  string
		first []byte // before startup
		after []byte // after the first auth request
		code  string // the SQLSTATE of the refusal; "": a close without one
	}{
		{name: "random bytes", first: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), code: proto.CodeProtocolViolation},
		{name: "zero length", first: []byte{0, 0, 0, 0}, code: proto.CodeProtocolViolation},
		{name: "huge startup length", first: bigLen(1 << 30), code: proto.CodeProtocolViolation},
		{name: "startup just over 10000", first: bigLen(10001), code: proto.CodeProtocolViolation},
		{name: "bad protocol version", first: append(bigLen(8)[:4], 0, 2, 0, 0), code: proto.CodeProtocolViolation},
		{name: "startup without terminator", first: append(bigLen(16)[:4], 0, 3, 0, 0, 'u', 's', 'e', 'r', 0, 'x', 'x', 'x'), code: proto.CodeProtocolViolation},
		{name: "no user", first: proto.Append(nil, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: map[string]string{"database": "app"}}), code: proto.CodeInvalidAuthorization},
		{name: "oversized SASL response", after: append([]byte{'p'}, bigLen(100 << 20)[:4]...), code: proto.CodeProtocolViolation},
		{name: "negative message length", after: []byte{'p', 0xff, 0xff, 0xff, 0xff}, code: proto.CodeProtocolViolation},
		{name: "unknown message type", after: []byte{'?', 0, 0, 0, 4}, code: proto.CodeProtocolViolation},
		{name: "malformed SASL initial", after: []byte{'p', 0, 0, 0, 6, 'x', 'y'}, code: proto.CodeProtocolViolation},
		{name: "terminate", after: []byte{'X', 0, 0, 0, 4}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRaw(t, p)
			if tc.first != nil {
				c.write(tc.first)
			} else {
				c.write(startup(alice, "app", p.code(alice)))
				if m, err := c.next(); err != nil {
					t.Fatalf("no auth request: %v", err)
				} else if _, ok := m.(*pgproto3.AuthenticationSASL); !ok {
					t.Fatalf("got %T", m)
				}
				c.write(tc.after)
			}
			e := c.expectRefusal()
			switch {
			case tc.code == "" && e != nil:
				t.Fatalf("want a close without an error, got %s: %s", e.Code, e.Message)
			case tc.code != "" && e == nil:
				t.Fatalf("want ErrorResponse %s, got a close without one", tc.code)
			case e != nil && (e.Code != tc.code || e.Severity != "FATAL"):
				t.Fatalf("want FATAL %s, got %s %s: %s", tc.code, e.Severity, e.Code, e.Message)
			}
			// The connection ends.
			if _, err := c.next(); err == nil {
				t.Fatal("the connection stayed open after a refusal")
			}
		})
	}
	// Still serving.
	if _, stderr, err := p.psql(alice, alicePW, p.code(alice), "select 1"); err != nil {
		t.Fatalf("proxy stopped serving after garbage: %v\n%s", err, stderr)
	}
}

// TestPgbenchThroughProxy: pgbench with one code in PGOPTIONS and
// --mfa-remember finishes with zero errors.
func TestPgbenchThroughProxy(t *testing.T) {
	if _, err := exec.LookPath("pgbench"); err != nil {
		pgtest.SkipOrFail(t, "pgbench not installed")
	}
	p := startProxy(t, mfa.Options{Remember: time.Minute}, nil)
	if _, err := p.pg.PsqlDB("app", "create table if not exists bench_kv(k int primary key, v int); insert into bench_kv select g, g from generate_series(1,1000) g on conflict do nothing"); err != nil {
		t.Fatal(err)
	}
	script := t.TempDir() + "/s.sql"
	os.WriteFile(script, []byte("\\set k random(1, 1000)\nselect v from bench_kv where k = :k;\n"), 0o644)
	cmd := exec.Command("pgbench", "-n", "-c", "8", "-j", "2", "-T", "5", "-f", script,
		"-h", p.host, "-p", strconv.Itoa(p.port), "-U", alice, "app")
	cmd.Env = append(os.Environ(), "PGPASSWORD="+alicePW, "PGOPTIONS=-c pgmfa.code="+p.code(alice), "PGSSLMODE=disable")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pgbench: %v\n%s", err, out)
	}
	s := string(out)
	if !strings.Contains(s, "number of failed transactions: 0") {
		t.Fatalf("pgbench reported failures:\n%s", s)
	}
	if !strings.Contains(s, "number of transactions actually processed") {
		t.Fatalf("unexpected pgbench output:\n%s", s)
	}
	t.Log(s[strings.Index(s, "number of transactions"):])
}
