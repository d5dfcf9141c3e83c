package session

import (
	"encoding/binary"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/proto"
)

// Well-formed messages the fuzzer can splice into a run, so it reaches the
// deep states (held login, MFA pending) and not only framing errors.
var (
	serverMenu = [][]byte{
		enc(&pgproto3.AuthenticationOk{}),
		enc(&pgproto3.AuthenticationCleartextPassword{}),
		enc(&pgproto3.AuthenticationMD5Password{Salt: [4]byte{1, 2, 3, 4}}),
		enc(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"}}),
		enc(&pgproto3.AuthenticationSASLContinue{Data: []byte("r=abc,s=c2FsdA==,i=4096")}),
		enc(&pgproto3.AuthenticationSASLFinal{Data: []byte("v=xxxx")}),
		enc(&pgproto3.ParameterStatus{Name: "a", Value: "b"}),
		enc(&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{1, 2, 3, 4}}),
		enc(&pgproto3.ReadyForQuery{TxStatus: 'I'}),
		enc(&pgproto3.ErrorResponse{Severity: "FATAL", Code: "28P01", Message: "no"}),
		enc(&pgproto3.NoticeResponse{Severity: "NOTICE", Message: "hi"}),
		enc(&pgproto3.DataRow{Values: [][]byte{[]byte("leak")}}),
	}
	clientMenu = [][]byte{
		startupBytes(map[string]string{"user": "u", "options": "-c pgmfa.code=123456"}),
		startupBytes(map[string]string{"user": "u"}),
		enc(&pgproto3.SSLRequest{}),
		enc(&pgproto3.PasswordMessage{Password: "pw123456"}),
		enc(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte("n,,n=,r=abc")}),
		enc(&pgproto3.SASLResponse{Data: []byte("c=biws,r=abcdef,p=AAAA")}),
		enc(&pgproto3.Query{String: "select 'leak'"}),
		enc(&pgproto3.Parse{Query: "select 'leak'"}),
		enc(&pgproto3.Terminate{}),
	}
)

// FuzzSessionInvariant runs the machine through arbitrary interleavings of
// client bytes, server bytes and events, and checks the product's security
// invariant on everything it emits:
//   - the client never receives AuthenticationOk unless a positive MFA
//     decision was delivered first;
//   - nothing but authentication responses (and Terminate) goes upstream
//     before the release;
//   - with AuthAccounts (script byte 8: cleartext, 9: SCRAM), the database
//     is not even dialed before MFA passed.
func FuzzSessionInvariant(f *testing.F) {
	f.Add([]byte{6, 0, 2, 0, 5, 1, 6, 3, 5, 0, 5, 7, 5, 8, 3, 1})
	f.Add([]byte{6, 0, 2, 0, 5, 1, 6, 3, 5, 0, 6, 6, 5, 8, 3, 1})
	f.Add([]byte{6, 0, 2, 0, 5, 3, 6, 4, 5, 4, 6, 5, 5, 5, 5, 0, 5, 9, 3, 1})
	f.Add([]byte{7, 6, 1, 6, 3, 2, 0, 5, 1, 5, 0, 5, 8, 3, 1})
	f.Add(accountsSeed)
	f.Add([]byte{9, 6, 1, 6, 4, 6, 5, 3, 1, 2, 0})
	f.Fuzz(func(t *testing.T, script []byte) { runScript(t, script) })
}

// runScript interprets script as operations (two bytes each: op, arg) and
// reports whether the session was released.
func runScript(t *testing.T, script []byte) (released bool) {
	cfg := Config{Rand: fixedRand(3), MaxPipelined: 4096, MaxMessageLen: 4096, AllowCleartext: true}
	if len(script) > 0 && script[0] == 7 {
		cfg.Auth = AuthPassword
		script = script[1:]
	}
	accounts := len(script) > 0 && (script[0] == 8 || script[0] == 9)
	if accounts {
		cfg.Auth, cfg.Accounts, cfg.AccountMethod = AuthAccounts, fuzzAccounts, proto.MethodPassword
		if script[0] == 9 {
			cfg.AccountMethod = proto.MethodSCRAM
		}
		script = script[1:]
	}
	m := New(cfg)
	var clientBuf, upBuf []byte
	decided := false
	connected := false
	check := func(out Output, phaseBefore Phase) {
		if out.Established != nil && !decided {
			t.Fatal("released without a positive MFA decision")
		}
		if out.Established != nil {
			released = true
		}
		if accounts && out.Dial && !decided {
			t.Fatal("AuthAccounts dialed the database before MFA passed")
		}
		// Client side.
		b := out.ToClient
		if phaseBefore == PhaseStartup && len(b) == 1 && b[0] == 'N' {
			b = nil
		}
		for len(b) > 0 {
			msg, n, err := proto.NextMessage(b, 1<<20)
			if err != nil || n == 0 {
				t.Fatalf("machine emitted unframed bytes to the client: %q", b)
			}
			if msg.Type == 'R' && len(msg.Body) >= 4 && binary.BigEndian.Uint32(msg.Body) == 0 && !decided {
				t.Fatal("AuthenticationOk reached the client before MFA passed")
			}
			if (msg.Type == 'D' || msg.Type == 'T' || msg.Type == 'C') && out.Established == nil {
				t.Fatalf("query result message %q reached the client during login", msg.Type)
			}
			b = b[n:]
		}
		// Upstream side (the startup packet from UpstreamConnected is
		// checked by the caller).
		b = out.ToUpstream
		for len(b) > 0 {
			msg, n, err := proto.NextMessage(b, 1<<20)
			if err != nil || n == 0 {
				t.Fatalf("machine emitted unframed bytes upstream: %q", b)
			}
			if msg.Type != 'p' && msg.Type != 'X' {
				t.Fatalf("message %q reached the database before the release", msg.Type)
			}
			b = b[n:]
		}
	}
	for i := 0; i+1 < len(script) && m.Phase() != PhaseClosed && m.Phase() != PhaseReady; i += 2 {
		op, arg := script[i]%8, script[i+1]
		before := m.Phase()
		switch op {
		case 0, 1: // raw bytes: the next arg bytes of the script
			end := i + 2 + int(arg%32)
			if end > len(script) {
				end = len(script)
			}
			chunk := script[i+2 : end]
			i = end - 2
			if op == 0 {
				clientBuf = append(clientBuf, chunk...)
			} else {
				upBuf = append(upBuf, chunk...)
			}
		case 2:
			if !connected {
				connected = true
				out := m.UpstreamConnected()
				out.ToUpstream = nil // the startup packet, untyped
				check(out, before)
			}
			continue
		case 3:
			if m.Phase() == PhaseMFA && arg&1 == 1 {
				decided = true
			}
			check(m.MFADecided(Decision{OK: arg&1 == 1, Message: "x"}), before)
			continue
		case 4:
			check(m.Timeout(arg&1 == 1), before)
			continue
		case 5:
			upBuf = append(upBuf, serverMenu[int(arg)%len(serverMenu)]...)
		case 6:
			clientBuf = append(clientBuf, clientMenu[int(arg)%len(clientMenu)]...)
		case 7:
			check(m.UpstreamClosed(nil), before)
			continue
		}
		for m.Phase() != PhaseClosed && m.Phase() != PhaseReady {
			before := m.Phase()
			n, out := m.FromClient(clientBuf)
			check(out, before)
			clientBuf = clientBuf[n:]
			if n == 0 {
				break
			}
		}
		if !connected {
			continue
		}
		for m.Phase() != PhaseClosed && m.Phase() != PhaseReady {
			before := m.Phase()
			n, out := m.FromUpstream(upBuf)
			check(out, before)
			upBuf = upBuf[n:]
			if n == 0 {
				break
			}
		}
	}
	return released
}

// The seeds must reach a release (and a refusal), or the fuzzer would only
// be exploring framing errors.
func TestInvariantSeedsReachRelease(t *testing.T) {
	// startup with code; connect; cleartext request; password; AuthOk;
	// BackendKeyData; ReadyForQuery; MFA ok.
	if !runScript(t, []byte{6, 0, 2, 0, 5, 1, 6, 3, 5, 0, 5, 7, 5, 8, 3, 1}) {
		t.Fatal("passthrough seed does not reach the release")
	}
	if !runScript(t, []byte{7, 6, 1, 6, 3, 2, 0, 5, 1, 5, 0, 5, 8, 3, 1}) {
		t.Fatal("password-mode seed does not reach the release")
	}
	if !runScript(t, accountsSeed) {
		t.Fatal("accounts seed does not reach the release")
	}
	if runScript(t, []byte{6, 0, 2, 0, 5, 1, 6, 3, 5, 0, 5, 8, 3, 0}) {
		t.Fatal("a failed MFA decision released the session")
	}
}

// fuzzAccounts holds account "u" with password "pw" (so "pw123456" is the
// password with a code), mapped to role "r" with database password "dbpw";
// one iteration keeps the fuzzer fast.
var fuzzAccounts = func() *testAccounts {
	a := &testAccounts{roles: proto.NewRoles(), up: map[string][2]string{"u": {"r", "dbpw"}}}
	if err := a.roles.Set("u", proto.NewSCRAMVerifier("pw", []byte("salt"), 1)); err != nil {
		panic(err)
	}
	return a
}()

// accountsSeed: accounts mode (cleartext); startup; password with code;
// MFA ok; connect; cleartext request; AuthOk; BackendKeyData; ReadyForQuery.
var accountsSeed = []byte{8, 6, 1, 6, 3, 3, 1, 2, 0, 5, 1, 5, 0, 5, 7, 5, 8}

type testAccounts struct {
	roles *proto.Roles
	up    map[string][2]string
}

func (a *testAccounts) Roles() *proto.Roles { return a.roles }
func (a *testAccounts) Upstream(account string) (string, string, bool) {
	u, ok := a.up[account]
	return u[0], u[1], ok
}
