package session

import (
	"bytes"
	crand "crypto/rand"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/proto"
)

// accountLogin runs the client side of an AuthAccounts login with
// proto.UpstreamLogin as the client (SCRAM or MD5, as the machine asks)
// until the machine stops asking. It returns the machine's outputs.
func accountLogin(t *testing.T, m *Machine, user, password string) []Output {
	outs, _ := accountLoginSent(t, m, user, password)
	return outs
}

// accountLoginSent is accountLogin that also returns what the client sent
// after its startup packet.
func accountLoginSent(t *testing.T, m *Machine, user, password string) ([]Output, [][]byte) {
	t.Helper()
	var sent [][]byte
	_, outs := feed(t, m.FromClient, startupBytes(map[string]string{"user": user, "application_name": "psql"}))
	cl := proto.NewUpstreamLogin(proto.UpstreamConfig{User: user, Password: password, Rand: crand.Reader})
	all := outs
	for range 5 {
		toClient, _, last := collect(outs)
		if last.Close || last.NeedMFA != nil || len(toClient) == 0 {
			return all, sent
		}
		var reply []byte
		for _, msg := range decodeAll(t, toClient) {
			bm, err := proto.DecodeBackend(msg)
			if err != nil {
				t.Fatal(err)
			}
			out, _, err := cl.Handle(bm)
			if err != nil {
				t.Fatalf("client: %v", err)
			}
			reply = append(reply, out...)
		}
		sent = append(sent, reply)
		_, outs = feed(t, m.FromClient, reply)
		all = append(all, outs...)
	}
	t.Fatal("login did not settle")
	return nil, nil
}

// A SCRAM client-final replayed into another login (a proof for another
// nonce) is refused as PostgreSQL refuses it (08P01), and so is a client
// selecting SCRAM-SHA-256-PLUS, which pgmfa never offers (PostgreSQL
// answers 08P01 to a mechanism it did not offer); neither dials or asks
// MFA. cmd/pgmfa TestAccountsHostileSCRAM compares these with PostgreSQL.
func TestAccountsReplayAndChannelBinding(t *testing.T) {
	_, sent := accountLoginSent(t, New(accountsConfig(proto.MethodSCRAM)), "alice", "alice-pw")
	if len(sent) != 2 {
		t.Fatalf("client sent %d messages", len(sent))
	}
	m := New(accountsConfig(proto.MethodSCRAM))
	feed(t, m.FromClient, startupBytes(map[string]string{"user": "alice"}))
	feed(t, m.FromClient, sent[0])
	_, outs := feed(t, m.FromClient, sent[1])
	_, _, last := collect(outs)
	var ae *proto.AuthError
	if !last.Close || last.Dial || last.NeedMFA != nil || !errors.As(last.Err, &ae) || ae.Code != proto.CodeProtocolViolation {
		t.Fatalf("replayed proof: %+v %v", last, last.Err)
	}
	m = New(accountsConfig(proto.MethodSCRAM))
	feed(t, m.FromClient, startupBytes(map[string]string{"user": "alice"}))
	_, outs = feed(t, m.FromClient, enc(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256-PLUS", Data: []byte("p=tls-server-end-point,,n=,r=abc")}))
	_, _, last = collect(outs)
	if !last.Close || last.Dial || last.NeedMFA != nil || !errors.As(last.Err, &ae) || ae.Code != proto.CodeProtocolViolation {
		t.Fatalf("channel binding: %+v %v", last, last.Err)
	}
}

func accountsConfig(method string) Config {
	a := &testAccounts{roles: proto.NewRoles(), up: map[string][2]string{"alice": {"app_rw", "db-secret"}}}
	if err := a.roles.Set("alice", proto.NewSCRAMVerifier("alice-pw", []byte("0123456789abcdef"), 4096)); err != nil {
		panic(err)
	}
	a.up["bob"] = [2]string{"app_ro", ""}
	if err := a.roles.Set("bob", proto.NewMD5Verifier("bob", "bob-pw")); err != nil {
		panic(err)
	}
	return Config{Auth: AuthAccounts, Accounts: a, AccountMethod: method, AllowCleartext: true}
}

// A right password gets SASLFinal and an MFA request, never a dial; the
// dial follows a positive decision, the upstream login is the mapped
// role's with pgmfa's credential, and application_name names the account.
func TestAccountsSCRAMThenMFAThenDial(t *testing.T) {
	for _, tc := range []struct{ method, user, pw, want string }{
		{proto.MethodSCRAM, "alice", "alice-pw", proto.MethodSCRAM},
		{proto.MethodMD5, "bob", "bob-pw", proto.MethodMD5},
		{proto.MethodMD5, "alice", "alice-pw", proto.MethodSCRAM}, // a SCRAM verifier answers with SCRAM
	} {
		m := New(accountsConfig(tc.method))
		toClient, _, last := collect(accountLogin(t, m, tc.user, tc.pw))
		if last.Close || last.Dial || last.NeedMFA == nil || last.NeedMFA.User != tc.user {
			t.Fatalf("%s %s: want an MFA request and no dial, got %+v (%v)", tc.method, tc.user, last, last.Err)
		}
		for _, msg := range decodeAll(t, toClient) {
			if msg.Type == 'R' && bytes.Equal(msg.Body[:4], []byte{0, 0, 0, 0}) {
				t.Fatal("AuthenticationOk before MFA")
			}
		}
		out := m.MFADecided(Decision{OK: true})
		if !out.Dial || len(out.ToClient) > 0 {
			t.Fatalf("no dial after MFA: %+v", out)
		}
		up := m.UpstreamConnected().ToUpstream
		var sm proto.StartupMessage
		if err := sm.Decode(up[4:]); err != nil {
			t.Fatal(err)
		}
		role, _ := sm.Get("user")
		app, _ := sm.Get("application_name")
		db, _ := sm.Get("database")
		wantRole := map[string]string{"alice": "app_rw", "bob": "app_ro"}[tc.user]
		if role != wantRole || db != wantRole || app != tc.user+"/psql" {
			t.Fatalf("upstream startup user=%q database=%q application_name=%q", role, db, app)
		}
		_, outs := feed(t, m.FromUpstream, enc(&pgproto3.AuthenticationCleartextPassword{}))
		_, toUp, _ := collect(outs)
		if tc.user == "alice" && !bytes.Contains(toUp, []byte("db-secret")) {
			t.Fatalf("pgmfa did not answer with the account's database password: %q", toUp)
		}
		_, outs = feed(t, m.FromUpstream, enc(&pgproto3.AuthenticationOk{}, &pgproto3.ReadyForQuery{TxStatus: 'I'}))
		if _, _, last := collect(outs); last.Established == nil || m.Method() != tc.want || m.Phase() != PhaseReady {
			t.Fatalf("not released: %+v", last)
		}
	}
}

// A wrong password and an unknown user are refused with the same words,
// and neither ever dials nor asks for MFA.
func TestAccountsWrongPasswordLikeUnknownUser(t *testing.T) {
	refusal := func(user, pw string) []byte {
		m := New(accountsConfig(proto.MethodSCRAM))
		toClient, _, last := collect(accountLogin(t, m, user, pw))
		if !last.Close || last.Dial || last.NeedMFA != nil {
			t.Fatalf("%s: want a refusal, got %+v", user, last)
		}
		var ae *proto.AuthError
		if !errors.As(last.Err, &ae) || ae.Code != proto.CodeInvalidPassword {
			t.Fatalf("%s: %v", user, last.Err)
		}
		msgs := decodeAll(t, toClient)
		return bytes.ReplaceAll(msgs[len(msgs)-1].Body, []byte(user), []byte("USER"))
	}
	wrong, unknown := refusal("alice", "nope"), refusal("mallory", "nope")
	if !bytes.Equal(wrong, unknown) {
		t.Fatalf("refusals differ:\n%q\n%q", wrong, unknown)
	}
}

// MFA refused: closed without a dial. Cleartext over plaintext is refused
// unless allowed; with it, the code may end the password.
func TestAccountsMFARefusedAndCleartext(t *testing.T) {
	m := New(accountsConfig(proto.MethodSCRAM))
	accountLogin(t, m, "alice", "alice-pw")
	if out := m.MFADecided(Decision{OK: false, Message: "bad code"}); !out.Close || out.Dial {
		t.Fatalf("%+v", out)
	}
	cfg := accountsConfig(proto.MethodPassword)
	cfg.AllowCleartext = false
	m = New(cfg)
	if _, outs := feed(t, m.FromClient, startupBytes(map[string]string{"user": "alice"})); !outs[0].Close {
		t.Fatal("cleartext asked for over plaintext")
	}
	m = New(accountsConfig(proto.MethodPassword))
	feed(t, m.FromClient, startupBytes(map[string]string{"user": "alice"}))
	_, outs := feed(t, m.FromClient, enc(&pgproto3.PasswordMessage{Password: "alice-pw654321"}))
	if _, _, last := collect(outs); last.NeedMFA == nil || last.NeedMFA.Code != "654321" || last.NeedMFA.Source != SourcePassword {
		t.Fatalf("%+v", last)
	}
}
