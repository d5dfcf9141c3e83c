package loop_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

// The differential harness: one scripted client conversation is run
// directly against PostgreSQL and through pgmfa on each of its paths
// (spliced by the kernel, the user-space relay, and client TLS through
// package tlsproxy), and the message streams the client receives after the
// login must be the same, message by message and field by field.
//
// Allowed differences, each with its reason. Nothing else may differ; a
// difference found in the field gets a step in the script and, if it is
// legitimate, a line here.
//
//  1. Everything before AuthenticationOk is not compared: the
//     authentication exchange carries per-run SCRAM nonces, and pgmfa
//     removes the -PLUS mechanisms for TLS clients (channel binding cannot
//     survive a proxy that terminates TLS). What follows AuthenticationOk
//     (ParameterStatus set and order, BackendKeyData, ReadyForQuery) is
//     compared.
//  2. Backend PIDs and cancel secrets are per run: each PID is replaced by
//     its role ("self" — the recorded connection's backend, "other" — the
//     helper connection's), wherever it appears (BackendKeyData,
//     NotificationResponse, DataRow and message text), and a secret by its
//     length. That the client's PID is its backend's is asserted, not
//     normalised away: BackendKeyData.ProcessID must equal
//     pg_backend_pid().
//
// Timestamps would be the third; the script selects none.

// target is one way for the client to reach the database.
type target struct {
	name string
	host string
	port int
	tls  bool   // the client uses TLS (sslmode=require)
	px   *proxy // nil: direct
}

func (tg target) dsn(user, pw string) string {
	mode := "disable"
	if tg.tls {
		mode = "require"
	}
	return fmt.Sprintf("host=%s port=%d user=%s password=%s dbname=app sslmode=%s connect_timeout=20",
		tg.host, tg.port, user, pw, mode)
}

// recorder keeps every byte the client's Frontend reads (after TLS).
type recorder struct {
	mu sync.Mutex
	b  []byte
}

func (r *recorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	r.b = append(r.b, p...)
	r.mu.Unlock()
	return len(p), nil
}

func (r *recorder) bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]byte(nil), r.b...)
}

// wire is the recorded client connection, spoken to with pgproto3 after
// pgconn did the login.
type wire struct {
	t    *testing.T
	fe   *pgproto3.Frontend
	conn net.Conn
	pid  uint32
	key  []byte
	eof  bool // the server closed the connection
}

func dialRecorded(t *testing.T, tg target, rec *recorder) *wire {
	t.Helper()
	cfg, err := pgconn.ParseConfig(tg.dsn(svc, svcPW))
	if err != nil {
		t.Fatal(err)
	}
	cfg.BuildFrontend = func(r io.Reader, w io.Writer) *pgproto3.Frontend {
		return pgproto3.NewFrontend(io.TeeReader(r, rec), w)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("%s: connect: %v", tg.name, err)
	}
	hc, err := pc.Hijack()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hc.Conn.Close() })
	_ = hc.Conn.SetDeadline(time.Now().Add(60 * time.Second))
	return &wire{t: t, fe: hc.Frontend, conn: hc.Conn, pid: hc.PID, key: append([]byte(nil), hc.SecretKey...)}
}

func (w *wire) send(msgs ...pgproto3.FrontendMessage) {
	w.t.Helper()
	for _, m := range msgs {
		w.fe.Send(m)
	}
	if err := w.fe.Flush(); err != nil {
		w.t.Fatalf("send: %v", err)
	}
}

// until receives messages until one of type want arrives (or the stream
// ends; eof records that). It returns the text values of the DataRows and
// the SQLSTATEs of the errors seen on the way.
func (w *wire) until(want byte) (rows []string, codes []string) {
	w.t.Helper()
	for {
		m, err := w.fe.Receive()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				w.eof = true
				return
			}
			w.t.Fatalf("receive (waiting for %q): %v", want, err)
		}
		var typ byte
		switch m := m.(type) {
		case *pgproto3.DataRow:
			for _, v := range m.Values {
				rows = append(rows, string(v))
			}
			typ = 'D'
		case *pgproto3.ErrorResponse:
			codes = append(codes, m.Code)
			typ = 'E'
		case *pgproto3.ReadyForQuery:
			typ = 'Z'
		case *pgproto3.NotificationResponse:
			typ = 'A'
		case *pgproto3.CopyInResponse:
			typ = 'G'
		}
		if typ == want {
			return
		}
	}
}

// query runs one simple query and returns its row values.
func (w *wire) query(sql string) ([]string, []string) {
	w.t.Helper()
	w.send(&pgproto3.Query{String: sql})
	return w.until('Z')
}

// helperConn is an unrecorded second connection through the same target.
func helperConn(t *testing.T, tg target) *pgconn.PgConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := pgconn.Connect(ctx, tg.dsn(svc, svcPW))
	if err != nil {
		t.Fatalf("%s: helper connect: %v", tg.name, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func helperExec(t *testing.T, c *pgconn.PgConn, sql string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := c.Exec(ctx, sql).ReadAll()
	if err != nil {
		t.Fatalf("helper %q: %v", sql, err)
	}
	if len(res) == 0 || len(res[0].Rows) == 0 {
		return ""
	}
	return string(res[0].Rows[0][0])
}

// sendCancel sends a CancelRequest to the target as a client would: on a
// new connection, inside TLS when the session uses TLS (as libpq 17 and
// pgx do), and waits until the server closes it (as libpq does).
func sendCancel(t *testing.T, host string, port int, useTLS bool, pid uint32, secret []byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(port)), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if useTLS {
		if _, err := c.Write(proto.Append(nil, &pgproto3.SSLRequest{})); err != nil {
			t.Fatal(err)
		}
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'S' {
			t.Fatalf("SSLRequest for the cancel: %q %v", b[0], err)
		}
		c = tls.Client(c, &tls.Config{InsecureSkipVerify: true})
	}
	if _, err := c.Write(proto.Append(nil, &pgproto3.CancelRequest{ProcessID: pid, SecretKey: secret})); err != nil {
		t.Fatalf("write cancel: %v", err)
	}
	if n, err := io.Copy(io.Discard, c); n != 0 || (err != nil && !isClosed(err)) {
		t.Fatalf("cancel connection: %d bytes back, %v", n, err)
	}
}

func isClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "connection reset")
}

// waitSleeping polls (directly, as a superuser) until the backend runs
// pg_sleep, so that a cancel cannot arrive before the statement.
func waitSleeping(t *testing.T, admin *pgx.Conn, pid uint32) {
	t.Helper()
	ok := eventually(20*time.Second, func() bool {
		var n int
		err := admin.QueryRow(context.Background(),
			"select count(*) from pg_stat_activity where pid = $1 and state = 'active' and wait_event = 'PgSleep'", int64(pid)).Scan(&n)
		return err == nil && n == 1
	})
	if !ok {
		t.Fatalf("backend %d never reached pg_sleep", pid)
	}
}

// converse runs the script on one target and returns the normalised
// transcript of what the recorded client received.
func converse(t *testing.T, tg target, admin *pgx.Conn) []string {
	rec := &recorder{}
	w := dialRecorded(t, tg, rec)
	h := helperConn(t, tg)

	// The PID the client was given is its backend's.
	rows, _ := w.query("select pg_backend_pid()")
	if len(rows) != 1 || rows[0] != strconv.FormatUint(uint64(w.pid), 10) {
		t.Fatalf("%s: BackendKeyData PID %d, pg_backend_pid() %v", tg.name, w.pid, rows)
	}
	if got := helperExec(t, h, "select pg_backend_pid()"); got != strconv.FormatUint(uint64(h.PID()), 10) {
		t.Fatalf("%s: helper BackendKeyData PID %d, pg_backend_pid() %s", tg.name, h.PID(), got)
	}

	// Notices with every field, a ParameterStatus mid-session, errors.
	w.query(`do $$ begin
		raise notice using message = 'notice one', detail = 'the detail', hint = 'the hint', errcode = '01000';
		raise warning 'warned %', 2;
		raise notice 'from backend %', pg_backend_pid();
	end $$`)
	w.query("set application_name = 'differential'")
	w.query("select 1/0")
	w.query("selec 1")
	w.query("select 1; select 1/0; select 3")

	// NOTIFY: one's own notification carries one's own PID; another
	// backend's carries its PID.
	w.query("listen diff_ch")
	w.query("notify diff_ch, 'to myself'")
	helperExec(t, h, "notify diff_ch, 'from the other one'")
	w.until('A')

	// COPY out, COPY in, a COPY that fails on data and one the client fails.
	w.query(`copy (select g, 'row ' || g from generate_series(1, 3) g) to stdout`)
	w.query("create temp table diff_t (a int, b text)")
	w.send(&pgproto3.Query{String: "copy diff_t from stdin"})
	w.until('G')
	w.send(&pgproto3.CopyData{Data: []byte("1\tone\n2\ttwo\n")}, &pgproto3.CopyData{Data: []byte("3\tthree\n")}, &pgproto3.CopyDone{})
	w.until('Z')
	w.send(&pgproto3.Query{String: "copy diff_t from stdin"})
	w.until('G')
	w.send(&pgproto3.CopyData{Data: []byte("4\tfour\nx\ty\n")}, &pgproto3.CopyDone{})
	w.until('Z')
	w.send(&pgproto3.Query{String: "copy diff_t (a, b) from stdin with (format csv)"})
	w.until('G')
	w.send(&pgproto3.CopyData{Data: []byte("5,five\n")}, &pgproto3.CopyFail{Message: "the client gave up"})
	w.until('Z')
	w.query("select a + 0 as a, b || '' as b from diff_t order by a")

	// An extended-protocol pipeline in one write: a named statement with
	// Describe; an error that skips to Sync; a portal read in pieces;
	// Close.
	w.send(
		&pgproto3.Parse{Name: "s1", Query: "select $1::int + 1 as x, $2::text as y", ParameterOIDs: []uint32{23, 25}},
		&pgproto3.Describe{ObjectType: 'S', Name: "s1"},
		&pgproto3.Bind{PreparedStatement: "s1", Parameters: [][]byte{[]byte("41"), []byte("why")}},
		&pgproto3.Describe{ObjectType: 'P'},
		&pgproto3.Execute{},
		&pgproto3.Bind{PreparedStatement: "s1", Parameters: [][]byte{[]byte("1"), nil}, ResultFormatCodes: []int16{1, 0}},
		&pgproto3.Execute{},
		&pgproto3.Sync{},
		&pgproto3.Parse{Query: "select 1 / $1::int"},
		&pgproto3.Bind{Parameters: [][]byte{[]byte("0")}},
		&pgproto3.Execute{},
		&pgproto3.Bind{Parameters: [][]byte{[]byte("1")}},
		&pgproto3.Execute{},
		&pgproto3.Sync{},
		&pgproto3.Parse{Query: "select g from generate_series(1, 5) g"},
		&pgproto3.Bind{DestinationPortal: "p"},
		&pgproto3.Execute{Portal: "p", MaxRows: 2},
		&pgproto3.Execute{Portal: "p", MaxRows: 2},
		&pgproto3.Execute{Portal: "p"},
		&pgproto3.Sync{},
		&pgproto3.Close{ObjectType: 'S', Name: "s1"},
		&pgproto3.Parse{Query: "select * from no_such_table"},
		&pgproto3.Sync{},
	)
	for i := 0; i < 4; i++ {
		w.until('Z')
	}

	// A CancelRequest with the key the client was given, sent where the
	// client connected.
	w.send(&pgproto3.Query{String: "select pg_sleep(60)"})
	waitSleeping(t, admin, w.pid)
	sendCancel(t, tg.host, tg.port, tg.tls, w.pid, w.key)
	if _, codes := w.until('Z'); len(codes) != 1 || codes[0] != "57014" {
		t.Fatalf("%s: cancel with the client's key: errors %v, want 57014", tg.name, codes)
	}

	// pg_cancel_backend(<the client's PID>) from another connection.
	w.send(&pgproto3.Query{String: "select pg_sleep(60)"})
	waitSleeping(t, admin, w.pid)
	if got := helperExec(t, h, fmt.Sprintf("select pg_cancel_backend(%d)", w.pid)); got != "t" {
		t.Fatalf("%s: pg_cancel_backend returned %q", tg.name, got)
	}
	if _, codes := w.until('Z'); len(codes) != 1 || codes[0] != "57014" {
		t.Fatalf("%s: pg_cancel_backend: errors %v, want 57014", tg.name, codes)
	}
	w.query("select 'still here'")

	// pg_terminate_backend(<the client's PID>) from another connection:
	// FATAL 57P01, then the connection closes.
	if got := helperExec(t, h, fmt.Sprintf("select pg_terminate_backend(%d)", w.pid)); got != "t" {
		t.Fatalf("%s: pg_terminate_backend returned %q", tg.name, got)
	}
	if _, codes := w.until(0); !w.eof || len(codes) != 1 || codes[0] != "57P01" {
		t.Fatalf("%s: after pg_terminate_backend: errors %v, closed %v; want 57P01 and the close", tg.name, codes, w.eof)
	}

	tr := transcript(t, rec.bytes(), map[uint32]string{w.pid: "self", h.PID(): "other"})
	return append(tr, "EOF")
}

// transcript renders the recorded stream from AuthenticationOk on, one
// line per message, with the allowed differences normalised.
func transcript(t *testing.T, raw []byte, roles map[uint32]string) []string {
	t.Helper()
	// Whole numbers only: a PID such as 389 must not rewrite the 389 in a
	// source line number 3891.
	type pidRole struct {
		re   *regexp.Regexp
		role string
	}
	var byPID []pidRole
	for pid, role := range roles {
		byPID = append(byPID, pidRole{regexp.MustCompile(`\b` + strconv.FormatUint(uint64(pid), 10) + `\b`), "<" + role + ">"})
	}
	pids := func(s string) string {
		for _, p := range byPID {
			s = p.re.ReplaceAllLiteralString(s, p.role)
		}
		return s
	}
	var out []string
	authed := false
	for len(raw) > 0 {
		m, n, err := proto.NextMessage(raw, 1<<30)
		if err != nil || n == 0 {
			t.Fatalf("recorded stream: %v (%d bytes left)", err, len(raw))
		}
		raw = raw[n:]
		if !authed {
			// Allowed difference 1: the authentication exchange.
			authed = m.Type == 'R' && len(m.Body) == 4 && binary.BigEndian.Uint32(m.Body) == 0
			if authed {
				out = append(out, "AuthenticationOk")
			}
			continue
		}
		out = append(out, render(t, m, roles, pids))
	}
	return out
}

func render(t *testing.T, m proto.Message, roles map[uint32]string, pids func(string) string) string {
	t.Helper()
	role := func(pid uint32) string {
		if r, ok := roles[pid]; ok {
			return "<" + r + ">"
		}
		return fmt.Sprintf("<unknown pid %d>", pid)
	}
	decode := func(msg pgproto3.BackendMessage) {
		if err := msg.Decode(m.Body); err != nil {
			t.Fatalf("decode %q: %v", m.Type, err)
		}
	}
	switch m.Type {
	case 'K':
		var k pgproto3.BackendKeyData
		decode(&k)
		return fmt.Sprintf("BackendKeyData pid=%s secret=<%d bytes>", role(k.ProcessID), len(k.SecretKey))
	case 'A':
		var a pgproto3.NotificationResponse
		decode(&a)
		return fmt.Sprintf("NotificationResponse pid=%s channel=%q payload=%q", role(a.PID), a.Channel, a.Payload)
	case 'E', 'N':
		fields := noticeFields(m.Body)
		keys := make([]int, 0, len(fields))
		for k := range fields {
			keys = append(keys, int(k))
		}
		sort.Ints(keys)
		var b strings.Builder
		b.WriteString(map[byte]string{'E': "ErrorResponse", 'N': "NoticeResponse"}[m.Type])
		for _, k := range keys {
			fmt.Fprintf(&b, " %c=%q", k, pids(fields[byte(k)]))
		}
		return b.String()
	case 'D':
		var d pgproto3.DataRow
		decode(&d)
		vals := make([]string, len(d.Values))
		for i, v := range d.Values {
			if v == nil {
				vals[i] = "NULL"
			} else {
				vals[i] = strconv.Quote(pids(string(v)))
			}
		}
		return "DataRow " + strings.Join(vals, " ")
	case 'd':
		return "CopyData " + strconv.Quote(string(m.Body))
	case 'S':
		var p pgproto3.ParameterStatus
		decode(&p)
		return fmt.Sprintf("ParameterStatus %s=%q", p.Name, p.Value)
	case 'C':
		var c pgproto3.CommandComplete
		decode(&c)
		return "CommandComplete " + string(c.CommandTag)
	case 'Z':
		return fmt.Sprintf("ReadyForQuery %c", m.Body[0])
	}
	// Everything else (RowDescription, ParameterDescription, CopyIn/Out
	// responses, ParseComplete, PortalSuspended, ...) byte for byte.
	return fmt.Sprintf("%c %x", m.Type, m.Body)
}

// noticeFields splits the body of an ErrorResponse or NoticeResponse into
// its fields, every one of them (pgproto3 keeps unknown codes apart).
func noticeFields(body []byte) map[byte]string {
	f := map[byte]string{}
	for len(body) > 0 && body[0] != 0 {
		code := body[0]
		end := bytes.IndexByte(body[1:], 0)
		if end < 0 {
			f['?'] = string(body)
			break
		}
		f[code] = string(body[1 : 1+end])
		body = body[2+end:]
	}
	return f
}

// TestDifferential runs the script directly and on every pgmfa path and
// compares what the client received.
func TestDifferential(t *testing.T) {
	pg := cluster(t)
	admin, err := pgx.Connect(context.Background(), pg.DSN(alice, alicePW, "app"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())

	direct := target{name: "direct", host: pg.Host, port: pg.Port}
	want := converse(t, direct, admin)
	if len(want) < 50 {
		t.Fatalf("the direct transcript is too short to mean anything:\n%s", strings.Join(want, "\n"))
	}

	pki := testPKI(t)
	certs, err := tlsproxy.LoadCerts(pki.CertFile, pki.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	type path struct {
		name string
		mod  func(*loop.Config)
		tls  bool
		stat string // the counter that proves the path was taken
	}
	var paths []path
	for _, mode := range spliceModes(t) {
		stat := map[string]string{loop.SpliceOff: "relayed", loop.SpliceSockmap: "spliced"}[mode]
		paths = append(paths, path{name: stat, mod: func(c *loop.Config) { c.Splice = mode }, stat: stat})
	}
	paths = append(paths, path{name: "tls", tls: true, stat: "tls", mod: func(c *loop.Config) {
		c.TLSCerts, c.TLSMode = certs, session.TLSAllow
	}})
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			px := startProxy(t, mfa.Options{}, p.mod)
			tg := target{name: p.name, host: px.host, port: px.port, tls: p.tls, px: px}
			got := converse(t, tg, admin)
			if d := diffLines(want, got); d != "" {
				t.Fatalf("through pgmfa (%s) the client received something else than directly:\n%s", p.name, d)
			}
			if st := px.srv.StatsSnapshot(); st[p.stat] < 2 {
				t.Fatalf("the sessions did not take the %s path: %v", p.name, st)
			}
		})
	}
	if testing.Verbose() {
		t.Logf("transcript (%d messages):\n%s", len(want), strings.Join(want, "\n"))
	}
}

// diffLines describes the first difference between two transcripts, with
// context; "" if they are equal.
func diffLines(want, got []string) string {
	n := min(len(want), len(got))
	i := 0
	for i < n && want[i] == got[i] {
		i++
	}
	if i == n && len(want) == len(got) {
		return ""
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "first difference at message %d (direct %d messages, pgmfa %d)\n", i, len(want), len(got))
	for j := max(0, i-3); j < i; j++ {
		fmt.Fprintf(&b, "    %s\n", want[j])
	}
	for j := i; j < min(i+3, len(want)); j++ {
		fmt.Fprintf(&b, "  - %s\n", want[j])
	}
	for j := i; j < min(i+3, len(got)); j++ {
		fmt.Fprintf(&b, "  + %s\n", got[j])
	}
	return b.String()
}

// TestCancelAcrossInstances: a fleet needs no shared state for cancels. The
// key a client got through one pgmfa instance cancels its query when sent
// to a second instance in front of the same database, or to the database
// directly.
func TestCancelAcrossInstances(t *testing.T) {
	pg := cluster(t)
	admin, err := pgx.Connect(context.Background(), pg.DSN(alice, alicePW, "app"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())
	a := startProxy(t, mfa.Options{}, nil)
	b := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Splice = loop.SpliceOff })
	tg := target{name: "instance A", host: a.host, port: a.port}
	w := dialRecorded(t, tg, &recorder{})
	for _, to := range []struct {
		name string
		host string
		port int
	}{{"second pgmfa instance", b.host, b.port}, {"database directly", pg.Host, pg.Port}} {
		w.send(&pgproto3.Query{String: "select pg_sleep(60)"})
		waitSleeping(t, admin, w.pid)
		sendCancel(t, to.host, to.port, false, w.pid, w.key)
		if _, codes := w.until('Z'); len(codes) != 1 || codes[0] != "57014" {
			t.Fatalf("cancel sent to the %s: errors %v, want 57014", to.name, codes)
		}
	}
	if !strings.Contains(b.logs.String(), "key of no session here forwarded") {
		t.Fatal("instance B did not log the forward of a key it does not know")
	}
}

// TestDifferentialUpstreamTLS: the same script with TLS between pgmfa and
// the database (--upstream-sslmode require: every session runs in package
// tlsproxy, cancels are forwarded inside TLS), compared with a direct
// connection to that database.
func TestDifferentialUpstreamTLS(t *testing.T) {
	cluster(t) // skips without PostgreSQL
	pki := testPKI(t)
	pg := pgtest.Start(t, pgcluster.Options{
		Method: pgcluster.ScramSHA256,
		Users: []pgcluster.User{
			{Name: alice, Password: alicePW, Superuser: true},
			{Name: svc, Password: svcPW},
		},
		Databases: []string{"app"},
		SSL:       &pgcluster.SSLFiles{CertFile: pki.CertFile, KeyFile: pki.KeyFile},
	})
	admin, err := pgx.Connect(context.Background(), pg.DSN(alice, alicePW, "app"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())
	want := converse(t, target{name: "direct", host: pg.Host, port: pg.Port}, admin)
	px := startProxy(t, mfa.Options{}, func(c *loop.Config) {
		c.Upstream = pg.Addr()
		c.UpstreamTLS = tlsproxy.UpstreamTLS{SSLMode: tlsproxy.SSLRequire}
	})
	got := converse(t, target{name: "tls-upstream", host: px.host, port: px.port, px: px}, admin)
	if d := diffLines(want, got); d != "" {
		t.Fatalf("through pgmfa (TLS to the database) the client received something else than directly:\n%s", d)
	}
	if st := px.srv.StatsSnapshot(); st["tls"] < 2 {
		t.Fatalf("the sessions did not run in the TLS driver: %v", st)
	}
}

// TestCancelForwardedVerbatim: a CancelRequest with a protocol 3.2 key (32
// secret bytes, as PostgreSQL 18 issues) reaches the database byte for
// byte, on the loop's path and through the TLS driver; and the client's
// cancel connection stays open until the database has closed the forwarded
// one (libpq waits for that close to know the cancel was processed).
func TestCancelForwardedVerbatim(t *testing.T) {
	cluster(t) // skips without PostgreSQL
	pki := testPKI(t)
	certs, err := tlsproxy.LoadCerts(pki.CertFile, pki.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	// A stand-in database that records a connection's first bytes and
	// closes it when told.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type accepted struct {
		got   []byte
		close func()
	}
	acc := make(chan accepted, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				_ = c.SetDeadline(time.Now().Add(20 * time.Second))
				buf := make([]byte, 4)
				if _, err := io.ReadFull(c, buf); err != nil {
					c.Close()
					return
				}
				rest := make([]byte, binary.BigEndian.Uint32(buf)-4)
				_, _ = io.ReadFull(c, rest)
				acc <- accepted{got: append(buf, rest...), close: func() { c.Close() }}
			}()
		}
	}()
	px := startProxy(t, mfa.Options{}, func(c *loop.Config) {
		c.Upstream = ln.Addr().String()
		c.TLSCerts, c.TLSMode = certs, session.TLSAllow
	})
	secret := bytes.Repeat([]byte{0xC3}, 32)
	want := proto.Append(nil, &pgproto3.CancelRequest{ProcessID: 31337, SecretKey: secret})
	for _, useTLS := range []bool{false, true} {
		t.Run(map[bool]string{false: "plaintext", true: "tls"}[useTLS], func(t *testing.T) {
			c, err := net.DialTimeout("tcp", net.JoinHostPort(px.host, strconv.Itoa(px.port)), 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			if useTLS {
				_, _ = c.Write(proto.Append(nil, &pgproto3.SSLRequest{}))
				var b [1]byte
				if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'S' {
					t.Fatalf("SSLRequest: %q %v", b[0], err)
				}
				c = tls.Client(c, &tls.Config{InsecureSkipVerify: true})
			}
			if _, err := c.Write(want); err != nil {
				t.Fatal(err)
			}
			var a accepted
			select {
			case a = <-acc:
			case <-time.After(20 * time.Second):
				t.Fatal("the cancel was not forwarded")
			}
			if !bytes.Equal(a.got, want) {
				t.Fatalf("forwarded %x, client sent %x", a.got, want)
			}
			// Still open while the database holds the forwarded connection
			// (a read that times out; a wrong close would show as EOF).
			_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			if _, err := c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("the client's cancel connection ended before the database closed the forward: %v", err)
			}
			a.close()
			_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
			if n, err := io.Copy(io.Discard, c); n != 0 || (err != nil && !isClosed(err)) {
				t.Fatalf("after the database's close: %d bytes, %v", n, err)
			}
		})
	}
}
