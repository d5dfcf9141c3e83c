package session

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/proto"
)

func enc(msgs ...pgproto3.Message) []byte { return proto.Append(nil, msgs...) }

func startupBytes(params map[string]string) []byte {
	return enc(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: params})
}

// fixedRand makes SCRAM nonces deterministic.
type fixedRand byte

func (f fixedRand) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(f) + byte(i)
	}
	return len(p), nil
}

// feed drives one side until the machine stops consuming.
func feed(t testing.TB, step func([]byte) (int, Output), b []byte) ([]byte, []Output) {
	var outs []Output
	for {
		n, out := step(b)
		outs = append(outs, out)
		if n == 0 {
			return b, outs
		}
		b = b[n:]
	}
}

func collect(outs []Output) (toClient, toUpstream []byte, last Output) {
	for _, o := range outs {
		toClient = append(toClient, o.ToClient...)
		toUpstream = append(toUpstream, o.ToUpstream...)
		if o.NeedMFA != nil {
			last.NeedMFA = o.NeedMFA
		}
		if o.Dial {
			last.Dial = true
		}
		if o.Established != nil {
			last.Established = o.Established
		}
		if o.Close {
			last.Close, last.Err = true, o.Err
		}
	}
	return
}

// loginToHeld runs a passthrough login with a cleartext-password server up
// to the point where the upstream is ready and everything is held.
func loginToHeld(t *testing.T, m *Machine) {
	t.Helper()
	_, outs := feed(t, m.FromClient, startupBytes(map[string]string{
		"user": "alice", "database": "app", "options": "-c pgmfa.code=123456 -c search_path=x",
	}))
	if _, _, l := collect(outs); !l.Dial {
		t.Fatal("no dial after startup")
	}
	out := m.UpstreamConnected()
	if !bytes.Contains(out.ToUpstream, []byte("search_path=x")) || bytes.Contains(out.ToUpstream, []byte("pgmfa")) {
		t.Fatalf("forwarded startup %q: want other options kept and pgmfa.code removed", out.ToUpstream)
	}
	_, outs = feed(t, m.FromUpstream, enc(&pgproto3.AuthenticationCleartextPassword{}))
	if c, _, _ := collect(outs); !bytes.Equal(c, enc(&pgproto3.AuthenticationCleartextPassword{})) {
		t.Fatalf("auth request not relayed: %q", c)
	}
	_, outs = feed(t, m.FromClient, enc(&pgproto3.PasswordMessage{Password: "pw"}))
	if _, u, _ := collect(outs); !bytes.Equal(u, enc(&pgproto3.PasswordMessage{Password: "pw"})) {
		t.Fatalf("password not relayed: %q", u)
	}
	server := enc(&pgproto3.AuthenticationOk{},
		&pgproto3.ParameterStatus{Name: "server_version", Value: "15.0"},
		&pgproto3.BackendKeyData{ProcessID: 77, SecretKey: []byte{9, 9, 9, 9}},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	_, outs = feed(t, m.FromUpstream, server)
	c, _, l := collect(outs)
	if len(c) != 0 {
		t.Fatalf("client got %q before MFA", c)
	}
	if l.NeedMFA == nil || l.NeedMFA.User != "alice" || l.NeedMFA.Code != "123456" || l.NeedMFA.Source != SourceStartup {
		t.Fatalf("NeedMFA = %+v", l.NeedMFA)
	}
}

func TestPassthroughReleaseAfterMFA(t *testing.T) {
	m := New(Config{Rand: fixedRand(1)})
	loginToHeld(t, m)
	if m.Phase() != PhaseMFA {
		t.Fatalf("phase %v", m.Phase())
	}
	out := m.MFADecided(Decision{OK: true})
	if out.Established == nil {
		t.Fatal("not released")
	}
	if k := out.Established.Key; k == nil || k.ProcessID != 77 || !bytes.Equal(k.SecretKey, []byte{9, 9, 9, 9}) {
		t.Fatalf("key: %+v", out.Established.Key)
	}
	msgs := decodeAll(t, out.ToClient)
	want := []byte{'R', 'S', 'K', 'Z'}
	if len(msgs) != len(want) {
		t.Fatalf("release = %d messages", len(msgs))
	}
	for i, m := range msgs {
		if m.Type != want[i] {
			t.Fatalf("release message %d = %q, want %q", i, m.Type, want[i])
		}
	}
	// The client gets the database's own key, byte for byte.
	if !bytes.Equal(msgs[2].Body, []byte{0, 0, 0, 77, 9, 9, 9, 9}) {
		t.Fatalf("BackendKeyData body %x: want the database's key (pid 77, secret 09090909)", msgs[2].Body)
	}
}

func TestMFAFailureClosesAndTerminates(t *testing.T) {
	m := New(Config{})
	loginToHeld(t, m)
	out := m.MFADecided(Decision{OK: false, Message: "bad code", Hint: "try again"})
	if !out.Close || out.Established != nil {
		t.Fatalf("out = %+v", out)
	}
	msgs := decodeAll(t, out.ToClient)
	if len(msgs) != 1 || msgs[0].Type != 'E' {
		t.Fatalf("client got %q", out.ToClient)
	}
	var e pgproto3.ErrorResponse
	e.Decode(msgs[0].Body)
	if e.Code != "28000" || e.Hint != "try again" || e.Severity != "FATAL" {
		t.Fatalf("error = %+v", e)
	}
	if !bytes.Equal(out.ToUpstream, enc(&pgproto3.Terminate{})) {
		t.Fatalf("upstream got %q, want Terminate", out.ToUpstream)
	}
}

// A query pipelined behind the password is neither parsed nor forwarded
// while the login is held; the caller keeps it.
func TestPipelinedBytesAreHeld(t *testing.T) {
	m := New(Config{})
	loginToHeld(t, m)
	q := enc(&pgproto3.Query{String: "select 1"})
	n, out := m.FromClient(q)
	if n != 0 || len(out.ToUpstream) != 0 || out.Close {
		t.Fatalf("held query: n=%d out=%+v", n, out)
	}
	big := make([]byte, (1<<20)+1)
	if _, out := m.FromClient(big); !out.Close {
		t.Fatal("unbounded pipelining accepted")
	}
}

// An error from the database after its AuthenticationOk is not shown
// before MFA passed; a failed MFA gets the MFA error instead.
func TestServerErrorAfterAuthOkIsHeld(t *testing.T) {
	for _, ok := range []bool{true, false} {
		m := New(Config{})
		feed(t, m.FromClient, startupBytes(map[string]string{"user": "alice", "database": "missing"}))
		m.UpstreamConnected()
		feed(t, m.FromUpstream, enc(&pgproto3.AuthenticationOk{}))
		_, outs := feed(t, m.FromUpstream, enc(&pgproto3.ErrorResponse{Severity: "FATAL", Code: "3D000", Message: `database "missing" does not exist`}))
		if c, _, _ := collect(outs); len(c) != 0 {
			t.Fatalf("client got %q before MFA", c)
		}
		// PostgreSQL hangs up right after a FATAL.
		if out := m.UpstreamClosed(io.EOF); out.Close || len(out.ToClient) != 0 {
			t.Fatalf("hang-up after a held error: %+v", out)
		}
		out := m.MFADecided(Decision{OK: ok, Message: "bad code"})
		if !out.Close {
			t.Fatal("not closed")
		}
		msgs := decodeAll(t, out.ToClient)
		var e pgproto3.ErrorResponse
		e.Decode(msgs[len(msgs)-1].Body)
		if ok && e.Code != "3D000" || !ok && e.Code != "28000" {
			t.Fatalf("MFA ok=%v: client got %+v", ok, e)
		}
	}
}

func TestSSLAndGSSRequestsGetN(t *testing.T) {
	m := New(Config{})
	n, out := m.FromClient(enc(&pgproto3.SSLRequest{}))
	if n != 8 || string(out.ToClient) != "N" {
		t.Fatalf("SSLRequest: %d %q", n, out.ToClient)
	}
	n, out = m.FromClient(enc(&pgproto3.GSSEncRequest{}))
	if n != 8 || string(out.ToClient) != "N" {
		t.Fatalf("GSSENCRequest: %d %q", n, out.ToClient)
	}
	if m.Phase() != PhaseStartup {
		t.Fatal("left the startup phase")
	}
}

func TestCancelRequestIsPassedUp(t *testing.T) {
	m := New(Config{})
	_, out := m.FromClient(enc(&pgproto3.CancelRequest{ProcessID: 5, SecretKey: []byte{1, 2, 3, 4}}))
	if out.Cancel == nil || out.Cancel.ProcessID != 5 || !out.Close || len(out.ToClient) != 0 {
		t.Fatalf("out = %+v", out)
	}
}

func TestPasswordModeSplitsCode(t *testing.T) {
	m := New(Config{Auth: AuthPassword, AllowCleartext: true})
	_, outs := feed(t, m.FromClient, startupBytes(map[string]string{"user": "bob"}))
	if c, _, _ := collect(outs); !bytes.Equal(c, enc(&pgproto3.AuthenticationCleartextPassword{})) {
		t.Fatalf("want a cleartext password request, got %q", c)
	}
	_, outs = feed(t, m.FromClient, enc(&pgproto3.PasswordMessage{Password: "hunter2" + "654321"}))
	if _, _, l := collect(outs); !l.Dial {
		t.Fatal("no dial")
	}
	out := m.UpstreamConnected()
	if bytes.Contains(out.ToUpstream, []byte("654321")) {
		t.Fatal("the code went upstream")
	}
	_, outs = feed(t, m.FromUpstream, enc(&pgproto3.AuthenticationCleartextPassword{}))
	_, up, _ := collect(outs)
	if !bytes.Equal(up, enc(&pgproto3.PasswordMessage{Password: "hunter2"})) {
		t.Fatalf("upstream password message %q", up)
	}
	_, outs = feed(t, m.FromUpstream, enc(&pgproto3.AuthenticationOk{}, &pgproto3.ReadyForQuery{TxStatus: 'I'}))
	c, _, l := collect(outs)
	if len(c) != 0 || l.NeedMFA == nil || l.NeedMFA.Code != "654321" || l.NeedMFA.Source != SourcePassword {
		t.Fatalf("client %q, NeedMFA %+v", c, l.NeedMFA)
	}
	if out := m.MFADecided(Decision{OK: true}); out.Established == nil {
		t.Fatal("not released")
	}
}

func TestPasswordModeRefusesPlaintext(t *testing.T) {
	m := New(Config{Auth: AuthPassword})
	_, outs := feed(t, m.FromClient, startupBytes(map[string]string{"user": "bob"}))
	_, _, l := collect(outs)
	var ae *proto.AuthError
	if !l.Close || !errors.As(l.Err, &ae) || ae.Code != "28000" {
		t.Fatalf("want 28000 refusal, got %+v", l)
	}
}

func TestSplitCode(t *testing.T) {
	for _, tc := range []struct {
		in, rest, code string
		ok             bool
	}{
		{"secret123456", "secret", "123456", true},
		{"123456", "123456", "", false},
		{"1234567", "1", "234567", true},
		{"secret12345x", "secret12345x", "", false},
		{"", "", "", false},
	} {
		rest, code, ok := SplitCode(tc.in, 6)
		if rest != tc.rest || code != tc.code || ok != tc.ok {
			t.Errorf("SplitCode(%q) = %q %q %v", tc.in, rest, code, ok)
		}
	}
}

func TestTimeouts(t *testing.T) {
	m := New(Config{})
	loginToHeld(t, m)
	out := m.Timeout(true)
	msgs := decodeAll(t, out.ToClient)
	var e pgproto3.ErrorResponse
	e.Decode(msgs[0].Body)
	if e.Code != "28000" || !bytes.Contains([]byte(e.Hint), []byte("pgmfa approve alice")) {
		t.Fatalf("MFA timeout error %+v", e)
	}
	m = New(Config{})
	if out := m.Timeout(false); !out.Close {
		t.Fatal("handshake timeout did not close")
	}
}

func decodeAll(t testing.TB, b []byte) []proto.Message {
	t.Helper()
	var msgs []proto.Message
	for len(b) > 0 {
		m, n, err := proto.NextMessage(b, 1<<20)
		if err != nil || n == 0 {
			t.Fatalf("undecodable output %q: %v", b, err)
		}
		msgs = append(msgs, m)
		b = b[n:]
	}
	return msgs
}

func TestTLSNegotiation(t *testing.T) {
	// TLS available: 'S' and StartTLS.
	m := New(Config{TLS: TLSAllow})
	n, out := m.FromClient(enc(&pgproto3.SSLRequest{}))
	if n != 8 || string(out.ToClient) != "S" || !out.StartTLS {
		t.Fatalf("SSLRequest with TLS: %d %+v", n, out)
	}
	m.SetEncrypted()
	if _, out := m.FromClient(enc(&pgproto3.SSLRequest{})); !out.Close {
		t.Fatal("a second SSLRequest inside TLS was accepted")
	}
	// Bytes after SSLRequest in the same read: closed, never processed.
	m = New(Config{TLS: TLSAllow})
	_, out = m.FromClient(append(enc(&pgproto3.SSLRequest{}), startupBytes(map[string]string{"user": "x"})...))
	if !out.Close || out.StartTLS || out.Dial {
		t.Fatalf("SSLRequest + trailing bytes: %+v", out)
	}
	// Direct TLS.
	m = New(Config{TLS: TLSAllow})
	if n, out := m.FromClient([]byte{0x16, 3, 1, 0, 5}); n != 0 || !out.DirectTLS || !out.StartTLS {
		t.Fatalf("direct TLS: %d %+v", n, out)
	}
	m = New(Config{})
	if _, out := m.FromClient([]byte{0x16, 3, 1, 0, 5}); !out.Close {
		t.Fatal("direct TLS without a certificate was not refused")
	}
	// GSSENCRequest then SSLRequest.
	m = New(Config{TLS: TLSAllow})
	if _, out := m.FromClient(enc(&pgproto3.GSSEncRequest{})); string(out.ToClient) != "N" {
		t.Fatal("GSSENCRequest not answered N")
	}
	if _, out := m.FromClient(enc(&pgproto3.SSLRequest{})); !out.StartTLS {
		t.Fatal("SSLRequest after GSSENCRequest refused")
	}
	// Require: plaintext startup refused with a hint.
	m = New(Config{TLS: TLSRequire})
	_, out = m.FromClient(startupBytes(map[string]string{"user": "x"}))
	var ae *proto.AuthError
	if !out.Close || !errors.As(out.Err, &ae) || ae.Code != "28000" || !bytes.Contains([]byte(ae.Hint), []byte("sslmode=require")) {
		t.Fatalf("plaintext under require: %+v", out)
	}
	// Password mode inside TLS needs no --allow-cleartext-password.
	m = New(Config{TLS: TLSRequire, Auth: AuthPassword})
	m.FromClient(enc(&pgproto3.SSLRequest{}))
	m.SetEncrypted()
	_, out = m.FromClient(startupBytes(map[string]string{"user": "x"}))
	if out.Close {
		t.Fatalf("password mode inside TLS refused: %v", out.Err)
	}
}

// TestReleaseCarriesDatabaseKey: whatever protocol version the client asked
// for and whatever key length the database chose (4 secret bytes for 3.0,
// up to 256 for 3.2; PostgreSQL 18 sends 32), the client receives the
// database's BackendKeyData unchanged, after the held NegotiateProtocolVersion
// when the database sent one.
func TestReleaseCarriesDatabaseKey(t *testing.T) {
	secret32 := bytes.Repeat([]byte{0xA5}, 32)
	secret256 := bytes.Repeat([]byte{0x5A}, 256)
	for _, tc := range []struct {
		name      string
		version   uint32
		negotiate *pgproto3.NegotiateProtocolVersion
		key       *pgproto3.BackendKeyData
	}{
		{"3.0", pgproto3.ProtocolVersion30, nil, &pgproto3.BackendKeyData{ProcessID: 4321, SecretKey: []byte{1, 2, 3, 4}}},
		{"3.2", pgproto3.ProtocolVersion32, nil, &pgproto3.BackendKeyData{ProcessID: 4322, SecretKey: secret32}},
		{"3.2 longest", pgproto3.ProtocolVersion32, nil, &pgproto3.BackendKeyData{ProcessID: 4323, SecretKey: secret256}},
		{"3.2 negotiated down to 3.0", pgproto3.ProtocolVersion32,
			&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: pgproto3.ProtocolVersion30}, &pgproto3.BackendKeyData{ProcessID: 4324, SecretKey: []byte{4, 3, 2, 1}}},
		{"no key", pgproto3.ProtocolVersion30, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := New(Config{})
			_, outs := feed(t, m.FromClient, enc(&pgproto3.StartupMessage{ProtocolVersion: tc.version,
				Parameters: map[string]string{"user": "alice", "options": "-c pgmfa.code=123456"}}))
			if _, _, l := collect(outs); !l.Dial {
				t.Fatal("no dial")
			}
			m.UpstreamConnected()
			var server []pgproto3.BackendMessage
			if tc.negotiate != nil {
				server = append(server, tc.negotiate)
			}
			server = append(server, &pgproto3.AuthenticationOk{}, &pgproto3.ParameterStatus{Name: "server_version", Value: "18.0"})
			if tc.key != nil {
				server = append(server, tc.key)
			}
			server = append(server, &pgproto3.ReadyForQuery{TxStatus: 'I'})
			var raw []byte
			for _, msg := range server {
				raw = append(raw, enc(msg)...)
			}
			feed(t, m.FromUpstream, raw)
			out := m.MFADecided(Decision{OK: true})
			if out.Established == nil {
				t.Fatal("not released")
			}
			var got *pgproto3.BackendKeyData
			for _, msg := range decodeAll(t, out.ToClient) {
				if msg.Type == 'K' {
					if got != nil {
						t.Fatal("two BackendKeyData messages")
					}
					got = &pgproto3.BackendKeyData{}
					if err := got.Decode(msg.Body); err != nil {
						t.Fatal(err)
					}
				}
			}
			if tc.key == nil {
				if got != nil || out.Established.Key != nil {
					t.Fatalf("a key appeared from nowhere: %+v %+v", got, out.Established.Key)
				}
				return
			}
			if got == nil || got.ProcessID != tc.key.ProcessID || !bytes.Equal(got.SecretKey, tc.key.SecretKey) {
				t.Fatalf("client got %+v, database sent %+v", got, tc.key)
			}
			if k := out.Established.Key; k == nil || k.ProcessID != tc.key.ProcessID || !bytes.Equal(k.SecretKey, tc.key.SecretKey) {
				t.Fatalf("Established.Key %+v, database sent %+v", k, tc.key)
			}
		})
	}
}

// TestDatabaseOverLimit: what the database sends during one login, parsed
// or held unparsed, is bounded by MaxFromUpstream; past it the login ends
// with 08006 and a Terminate to the database, and without a word to the
// client while a refusal of the database is held for the MFA decision.
func TestDatabaseOverLimit(t *testing.T) {
	t.Run("default", func(t *testing.T) {
		for _, tc := range []struct{ maxMsg, want int64 }{{0, 4 << 20}, {1 << 20, 4 << 20}, {3 << 20, 6 << 20}} {
			if got := New(Config{MaxMessageLen: int(tc.maxMsg)}).cfg.MaxFromUpstream; got != tc.want {
				t.Errorf("MaxMessageLen %d: MaxFromUpstream %d, want %d", tc.maxMsg, got, tc.want)
			}
		}
	})
	overLimit := func(t *testing.T, out Output) {
		t.Helper()
		if !out.Close || !bytes.Equal(out.ToUpstream, enc(&pgproto3.Terminate{})) {
			t.Fatalf("over the limit: %+v", out)
		}
		msgs := decodeAll(t, out.ToClient)
		var e pgproto3.ErrorResponse
		if len(msgs) != 1 || msgs[0].Type != 'E' || e.Decode(msgs[0].Body) != nil || e.Code != "08006" ||
			e.Message != ErrUpstreamOverLimit.Error() {
			t.Fatalf("client got %q", out.ToClient)
		}
	}
	t.Run("held after ReadyForQuery", func(t *testing.T) {
		const limit = 4096
		m := New(Config{MaxFromUpstream: limit})
		loginToHeld(t, m)
		// Up to the limit the bytes stay with the caller, unparsed.
		held := make([]byte, limit-m.upTaken)
		if n, out := m.FromUpstream(held); n != 0 || out.Close || len(out.ToClient) != 0 {
			t.Fatalf("at the limit: n=%d out=%+v", n, out)
		}
		_, out := m.FromUpstream(append(held, 'N'))
		overLimit(t, out)
		if m.Phase() != PhaseClosed {
			t.Fatalf("phase %v", m.Phase())
		}
	})
	t.Run("parsed messages count", func(t *testing.T) {
		const limit = 8192
		m := New(Config{MaxFromUpstream: limit})
		feed(t, m.FromClient, startupBytes(map[string]string{"user": "alice"}))
		m.UpstreamConnected()
		feed(t, m.FromUpstream, enc(&pgproto3.AuthenticationOk{}))
		// ParameterStatus one at a time, each parsed and held by the
		// machine until the MFA decision: the caller's buffer never grows.
		ps := enc(&pgproto3.ParameterStatus{Name: "x", Value: string(make([]byte, 100))})
		for sent := 0; ; sent += len(ps) {
			n, out := m.FromUpstream(ps)
			if out.Close {
				if sent+len(ps) <= limit {
					t.Fatalf("ended after %d bytes, limit %d", sent, limit)
				}
				overLimit(t, out)
				return
			}
			if n != len(ps) {
				t.Fatalf("ParameterStatus not consumed: n=%d", n)
			}
			if sent > limit {
				t.Fatalf("%d bytes taken, limit %d", sent, limit)
			}
		}
	})
	t.Run("refusal held", func(t *testing.T) {
		m := New(Config{MaxFromUpstream: 4096})
		feed(t, m.FromClient, startupBytes(map[string]string{"user": "alice", "database": "missing"}))
		m.UpstreamConnected()
		feed(t, m.FromUpstream, enc(&pgproto3.AuthenticationOk{},
			&pgproto3.ErrorResponse{Severity: "FATAL", Code: "3D000", Message: "no such database"}))
		_, out := m.FromUpstream(make([]byte, 4096))
		if !out.Close || len(out.ToClient) != 0 || !errors.Is(out.Err, ErrUpstreamOverLimit) {
			t.Fatalf("over the limit with a held refusal: %+v", out)
		}
	})
}
