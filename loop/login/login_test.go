package login

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/pquerna/otp/totp"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

func TestTimeoutsWithDefaults(t *testing.T) {
	for _, tc := range []struct{ in, want Timeouts }{
		{Timeouts{}, Timeouts{Startup: DefaultStartupTimeout, Handshake: DefaultHandshakeTimeout, MFA: DefaultMFATimeout}},
		{Timeouts{Startup: -1, Handshake: -1, MFA: -1}, Timeouts{Startup: DefaultStartupTimeout, Handshake: DefaultHandshakeTimeout, MFA: DefaultMFATimeout}},
		// The startup bound never outlasts the whole login's.
		{Timeouts{Handshake: 2 * time.Second}, Timeouts{Startup: 2 * time.Second, Handshake: 2 * time.Second, MFA: DefaultMFATimeout}},
		{Timeouts{Startup: time.Minute, Handshake: 30 * time.Second, MFA: time.Second}, Timeouts{Startup: 30 * time.Second, Handshake: 30 * time.Second, MFA: time.Second}},
		{Timeouts{Startup: time.Second, Handshake: 8 * time.Second, MFA: 3 * time.Second}, Timeouts{Startup: time.Second, Handshake: 8 * time.Second, MFA: 3 * time.Second}},
	} {
		if got := tc.in.WithDefaults(); got != tc.want {
			t.Errorf("%+v.WithDefaults() = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

// secrets is an in-memory secret source.
type secrets map[string]string

func (s secrets) Secret(user string) (string, bool) { v, ok := s[user]; return v, ok }

const aliceSecret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"

// logLines decodes the JSON lines written to buf.
func logLines(t *testing.T, buf *bytes.Buffer) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		if l == "" {
			continue
		}
		m := map[string]any{}
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

func newLog() (*slog.Logger, *bytes.Buffer) {
	buf := &bytes.Buffer{}
	return slog.New(slog.NewJSONHandler(buf, nil)), buf
}

func newGate(t *testing.T, log *slog.Logger) (*Gate, func() string) {
	t.Helper()
	now := time.Now()
	g := mfa.NewGuard(mfa.Options{Remember: time.Minute, Now: func() time.Time { return now }}, secrets{"alice": aliceSecret, "bob": aliceSecret})
	code := func() string {
		c, err := totp.GenerateCode(aliceSecret, now)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return &Gate{Required: true, Exempt: map[string]bool{"svc": true}, Guard: g, Approvals: mfa.NewApprovals(g), Logger: log}, code
}

func TestGateResolve(t *testing.T) {
	log, buf := newLog()
	g, code := newGate(t, log)
	never := func(mfa.Path, mfa.Outcome) { t.Error("a decision made now was also delivered later") }
	type want struct {
		path   mfa.Path
		ok     bool
		reason string
	}
	check := func(name string, req session.MFARequest, addr string, w want) {
		t.Helper()
		path, o, cancel, waiting := g.Resolve(&req, 7, addr, never)
		if waiting || cancel != nil || path != w.path || o.OK != w.ok || o.Reason != w.reason {
			t.Errorf("%s: path %q outcome %+v waiting %v, want %+v", name, path, o, waiting, w)
		}
		if !o.OK && (o.Code != mfa.SQLState || o.Message == "") {
			t.Errorf("%s: a refusal without its SQLSTATE and message: %+v", name, o)
		}
	}
	check("exempt", session.MFARequest{User: "svc"}, "10.0.0.1:1", want{mfa.PathExempt, true, ""})
	check("bad code", session.MFARequest{User: "alice", Code: "000000", Source: session.SourceStartup}, "10.0.0.1:1", want{mfa.PathCode, false, mfa.ReasonBadCode})
	check("not enrolled", session.MFARequest{User: "carol"}, "10.0.0.1:1", want{mfa.PathCode, false, mfa.ReasonNotEnrolled})
	check("code in the password", session.MFARequest{User: "alice", Code: code(), Source: session.SourcePassword}, "10.0.0.1:1", want{mfa.PathPassword, true, ""})
	// --mfa-remember: the same user from the same address, no code.
	check("remembered", session.MFARequest{User: "alice"}, "10.0.0.1:2", want{mfa.PathRemembered, true, ""})

	off := *g
	off.Required = false
	if path, o, _, waiting := off.Resolve(&session.MFARequest{User: "alice"}, 1, "10.0.0.9:1", never); path != mfa.PathExempt || !o.OK || waiting {
		t.Errorf("MFA off: path %q outcome %+v waiting %v", path, o, waiting)
	}

	// No code and nothing remembered: a wait for `pgmfa approve`, under
	// the connection's id.
	later := make(chan mfa.Outcome, 1)
	path, _, cancel, waiting := g.Resolve(&session.MFARequest{User: "bob", Database: "app"}, 42, "10.0.0.3:1",
		func(p mfa.Path, o mfa.Outcome) {
			if p != mfa.PathApproval {
				t.Errorf("approval delivered as %q", p)
			}
			later <- o
		})
	if !waiting || path != mfa.PathApproval || cancel == nil {
		t.Fatalf("no code: path %q waiting %v", path, waiting)
	}
	if l := g.Approvals.List(); len(l) != 1 || l[0].ID != 42 || l[0].User != "bob" || l[0].Database != "app" {
		t.Fatalf("waiting logins: %+v", l)
	}
	// A second login of bob waits too, and the proxy warns about the race.
	_, _, cancel2, waiting := g.Resolve(&session.MFARequest{User: "bob"}, 43, "10.0.0.4:1", never)
	if !waiting {
		t.Fatal("second login did not wait")
	}
	lines := logLines(t, buf)
	if len(lines) != 1 || lines[0]["msg"] != "another login of the user is already waiting for MFA approval" ||
		lines[0]["conn"] != float64(43) || lines[0]["waiting_conn"] != float64(42) || lines[0]["waiting_client"] != "10.0.0.3:1" {
		t.Fatalf("log: %v", lines)
	}
	cancel2() // withdrawn: never decided
	if r := g.Approvals.Approve(mfa.Approval{User: "bob", ConnID: 42, Code: code()}); !r.OK || len(r.Released) != 1 {
		t.Fatalf("approve: %+v", r)
	}
	if o := <-later; !o.OK {
		t.Fatalf("approved login got %+v", o)
	}
	cancel()
	if l := g.Approvals.List(); len(l) != 0 {
		t.Fatalf("still waiting: %+v", l)
	}
}

// A pool that opens many connections without a code: each new waiting
// login names the oldest few others and counts the rest in one line,
// instead of a line per waiting login (n² lines in all).
func TestGateResolveManyWaiting(t *testing.T) {
	log, buf := newLog()
	g, _ := newGate(t, log)
	never := func(mfa.Path, mfa.Outcome) {}
	const n = mfa.MaxOthers + 4
	for i := range n {
		_, _, cancel, waiting := g.Resolve(&session.MFARequest{User: "bob"}, uint64(100+i), "10.0.0.5:1", never)
		if !waiting {
			t.Fatalf("login %d did not wait", i)
		}
		defer cancel()
		if i < n-1 {
			buf.Reset()
		}
	}
	lines := logLines(t, buf)
	if len(lines) != mfa.MaxOthers+1 {
		t.Fatalf("the last login logged %d lines, want %d: %v", len(lines), mfa.MaxOthers+1, lines)
	}
	for i, l := range lines[:mfa.MaxOthers] {
		if l["msg"] != "another login of the user is already waiting for MFA approval" || l["waiting_conn"] != float64(100+i) {
			t.Errorf("line %d: %v", i, l)
		}
	}
	if l := lines[mfa.MaxOthers]; l["msg"] != "more logins of the user are already waiting for MFA approval" ||
		l["more_waiting"] != float64(n-1-mfa.MaxOthers) || l["conn"] != float64(100+n-1) {
		t.Errorf("summary line: %v", l)
	}
}

func TestGateAsk(t *testing.T) {
	g, _ := newGate(t, slog.New(slog.DiscardHandler))
	var got []mfa.Path
	cancel, waiting := g.Ask(&session.MFARequest{User: "svc"}, 1, "a:1", func(p mfa.Path, o mfa.Outcome) {
		if !o.OK {
			t.Errorf("exempt refused: %+v", o)
		}
		got = append(got, p)
	})
	// Decided now: delivered before Ask returns, exactly once.
	if waiting || cancel == nil || len(got) != 1 || got[0] != mfa.PathExempt {
		t.Fatalf("exempt: waiting %v, decisions %v", waiting, got)
	}
	cancel()
	cancel, waiting = g.Ask(&session.MFARequest{User: "alice"}, 2, "a:1", func(p mfa.Path, o mfa.Outcome) { got = append(got, p) })
	if !waiting || len(got) != 1 {
		t.Fatalf("no code: waiting %v, decisions %v", waiting, got)
	}
	cancel()
	if l := g.Approvals.List(); len(l) != 0 {
		t.Fatalf("cancel left a waiting login: %+v", l)
	}
}

// atMFA runs a passthrough login up to the MFA decision, with the
// database's ReadyForQuery in.
func atMFA(t *testing.T) *session.Machine {
	t.Helper()
	m := session.New(session.Config{})
	m.FromClient(proto.Append(nil, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": "alice", "database": "app"}}))
	m.UpstreamConnected()
	b := proto.Append(nil, &pgproto3.AuthenticationMD5Password{Salt: [4]byte{1, 2, 3, 4}})
	n, _ := m.FromUpstream(b)
	if n != len(b) {
		t.Fatal("auth request not taken")
	}
	b = proto.Append(nil, &pgproto3.PasswordMessage{Password: "md5x"})
	if n, _ := m.FromClient(b); n != len(b) {
		t.Fatal("password not taken")
	}
	b = proto.Append(nil, &pgproto3.AuthenticationOk{}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	for len(b) > 0 {
		n, _ := m.FromUpstream(b)
		if n == 0 {
			t.Fatal("login stalled")
		}
		b = b[n:]
	}
	if m.Phase() != session.PhaseMFA {
		t.Fatalf("phase %v", m.Phase())
	}
	return m
}

func TestRecordRefused(t *testing.T) {
	log, buf := newLog()
	var counted []bool
	r := NewRecord(log, 9, "", func(ok bool) { counted = append(counted, ok) })
	if r.Addr() != "unix" || r.id != 9 || time.Since(r.Start()) > time.Minute {
		t.Fatalf("record: %s %d %v", r.Addr(), r.id, r.Start())
	}
	if NewRecord(log, 1, "@", nil).Addr() != "unix" {
		t.Fatal("an unnamed unix peer is not called unix")
	}
	// Before a user name is known (a scan, a cancel request): no line.
	if r.Audit(session.New(session.Config{}), false, errors.New("x")) || buf.Len() != 0 || len(counted) != 0 {
		t.Fatalf("audit without a user: %q %v", buf, counted)
	}

	m := atMFA(t)
	cancels := 0
	r.Wait(&session.MFARequest{User: "alice"}, func() { cancels++ }, "tls", true)
	r.TimedOut()
	// (mfa.TimedOut's shape, written out: the gate's own refusal when
	// nobody approves in time.)
	out := r.Decide(m, mfa.PathApproval, mfa.Outcome{Reason: mfa.ReasonTimeout, Code: mfa.SQLState, Message: "not approved in time"})
	if !out.Close || out.Established != nil {
		t.Fatalf("refusal: %+v", out)
	}
	var e pgproto3.ErrorResponse
	if err := e.Decode(out.ToClient[5:]); err != nil || e.Code != mfa.SQLState {
		t.Fatalf("client got %q", out.ToClient)
	}
	r.StopWaiting()
	r.StopWaiting()
	if cancels != 1 {
		t.Fatalf("the wait was cancelled %d times", cancels)
	}
	if !r.Audit(m, false, out.Err, "tls", true) || r.Audit(m, false, out.Err) {
		t.Fatal("not exactly one audit line")
	}
	if len(counted) != 1 || counted[0] {
		t.Fatalf("counted %v", counted)
	}
	lines := logLines(t, buf)
	if len(lines) != 2 {
		t.Fatalf("lines: %v", lines)
	}
	w := lines[0]
	if w["msg"] != "login waiting for MFA approval" || w["conn"] != float64(9) || w["client"] != "unix" ||
		w["user"] != "alice" || w["approve_with"] != "pgmfa approve alice CODE" || w["tls"] != true {
		t.Errorf("waiting line: %v", w)
	}
	a := lines[1]
	for k, v := range map[string]any{"msg": "login", "level": "WARN", "conn": float64(9), "client": "unix", "user": "alice",
		"database": "app", "method": "md5", "mfa": "approval", "mfa_result": mfa.ReasonTimeout, "tls": true,
		"result": "refused", "phase": "mfa", "error": out.Err.Error()} {
		if a[k] != v {
			t.Errorf("audit line %s = %v, want %v (line %v)", k, a[k], v, a)
		}
	}
	if _, ok := a["duration"]; !ok {
		t.Errorf("audit line without duration: %v", a)
	}
}

func TestRecordSession(t *testing.T) {
	log, buf := newLog()
	var counted []bool
	r := NewRecord(log, 3, "127.0.0.1:5000", func(ok bool) { counted = append(counted, ok) })
	m := atMFA(t)
	out := r.Decide(m, mfa.PathExempt, mfa.Outcome{OK: true})
	if out.Established == nil {
		t.Fatalf("not released: %+v", out)
	}
	r.StopWaiting() // no wait: nothing to cancel
	r.Audit(m, true, nil)
	r.End(m, Stats{Mode: ModeSockmap, ClientToServer: 10, ServerToClient: 20, Duration: 1500 * time.Millisecond,
		Reason: "client closed", FlowControl: 2, Relayed: 5})
	r.End(m, Stats{Mode: ModeTLSRelay, Reason: "database closed"})
	if len(counted) != 1 || !counted[0] {
		t.Fatalf("counted %v", counted)
	}
	lines := logLines(t, buf)
	if len(lines) != 3 {
		t.Fatalf("lines: %v", lines)
	}
	ok := lines[0]
	for k, v := range map[string]any{"msg": "login", "level": "INFO", "result": "ok", "mfa": "exempt", "method": "md5", "client": "127.0.0.1:5000"} {
		if ok[k] != v {
			t.Errorf("audit line %s = %v, want %v", k, ok[k], v)
		}
	}
	for _, k := range []string{"mfa_result", "error", "phase", "tls"} {
		if _, has := ok[k]; has {
			t.Errorf("ok line has %s: %v", k, ok)
		}
	}
	// Every session-end line has every field, whichever path carried it.
	for i, want := range []map[string]any{
		{"mode": "sockmap", "bytes_client_to_server": float64(10), "bytes_server_to_client": float64(20),
			"flow_control": float64(2), "relayed_bytes": float64(5), "duration": float64(1500 * time.Millisecond), "reason": "client closed"},
		{"mode": "tls-relay", "bytes_client_to_server": float64(0), "bytes_server_to_client": float64(0),
			"flow_control": float64(0), "relayed_bytes": float64(0), "duration": float64(0), "reason": "database closed"},
	} {
		e := lines[1+i]
		want["msg"], want["conn"], want["client"], want["user"], want["database"] = "session end", float64(3), "127.0.0.1:5000", "alice", "app"
		for k, v := range want {
			if e[k] != v {
				t.Errorf("session end %d: %s = %v, want %v", i, k, e[k], v)
			}
		}
	}
}

func TestDecision(t *testing.T) {
	o := mfa.Outcome{OK: false, Reason: mfa.ReasonBadCode, Code: "28000", Message: "m", Hint: "h"}
	if d := Decision(o); d != (session.Decision{Code: "28000", Message: "m", Hint: "h"}) {
		t.Fatalf("Decision(%+v) = %+v", o, d)
	}
	if d := Decision(mfa.Outcome{OK: true}); !d.OK {
		t.Fatalf("ok outcome: %+v", d)
	}
}

// sharedSecrets is secrets with the fleet state of mfa.Shared in memory:
// what a PostgreSQL store keeps for every instance.
type sharedSecrets struct {
	secrets
	mu     sync.Mutex
	steps  map[string]int64
	grants map[string]mfa.Grant
}

func (s *sharedSecrets) ClaimStep(user string, step int64, secret string) (bool, error) {
	return s.ClaimStepGrant(user, step, secret, "", mfa.Grant{})
}

func (s *sharedSecrets) ClaimStepGrant(user string, step int64, _ string, key string, g mfa.Grant) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if last, ok := s.steps[user]; ok && last >= step {
		return false, nil
	}
	s.steps[user] = step
	if key != "" {
		s.grants[key] = g
	}
	return true, nil
}

func (s *sharedSecrets) Failures([]string, time.Time) (map[string][]time.Time, error) {
	return nil, nil
}
func (s *sharedSecrets) AddFailure([]string, time.Time) error { return nil }
func (s *sharedSecrets) ResetFailures(string) error           { return nil }

func (s *sharedSecrets) Grant(key string, now time.Time) (mfa.Grant, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	g, ok := s.grants[key]
	return g, ok && now.Before(g.Until), nil
}

func (s *sharedSecrets) PutGrant(key string, g mfa.Grant) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.grants[key] = g
	return nil
}

// A store with I/O keeps the remember window out of the event loop
// (Decided leaves it) but Resolve must still honour it: a grant written by
// one instance admits the next login without a code on another.
func TestGateResolveSharedRemember(t *testing.T) {
	now := time.Now()
	store := &sharedSecrets{secrets: secrets{"alice": aliceSecret}, steps: map[string]int64{}, grants: map[string]mfa.Grant{}}
	instance := func() *Gate {
		g := mfa.NewGuard(mfa.Options{Remember: time.Minute, Now: func() time.Time { return now }}, store)
		return &Gate{Required: true, Guard: g, Approvals: mfa.NewApprovals(g), Logger: slog.New(slog.DiscardHandler)}
	}
	a, b := instance(), instance()
	if a.Guard.InMemory() {
		t.Fatal("a guard over a shared store says it needs no I/O")
	}
	code, err := totp.GenerateCode(aliceSecret, now)
	if err != nil {
		t.Fatal(err)
	}
	never := func(mfa.Path, mfa.Outcome) { t.Error("a decision made now was also delivered later") }
	if path, o, _, waiting := a.Resolve(&session.MFARequest{User: "alice", Code: code, Source: session.SourceStartup}, 1, "10.0.0.1:1", never); waiting || !o.OK || path != mfa.PathCode {
		t.Fatalf("code on instance a: path %q outcome %+v waiting %v", path, o, waiting)
	}
	req := &session.MFARequest{User: "alice"}
	if _, _, ok := b.Decided(req, "10.0.0.1:2"); ok {
		t.Fatal("instance b decided a shared remember window on the loop (store I/O)")
	}
	path, o, cancel, waiting := b.Resolve(req, 2, "10.0.0.1:2", never)
	if waiting {
		cancel()
	}
	if waiting || !o.OK || path != mfa.PathRemembered {
		t.Fatalf("remembered login on instance b: path %q outcome %+v waiting %v", path, o, waiting)
	}
	// Another address is not remembered: it waits for an approval.
	if _, _, cancel, waiting := b.Resolve(req, 3, "10.0.0.2:1", never); !waiting {
		t.Fatal("a login from another address passed without a code")
	} else {
		cancel()
	}
}
