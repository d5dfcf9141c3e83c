package proto

import (
	"bytes"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

func msgOf(t testing.TB, m pgproto3.Message) Message {
	t.Helper()
	raw := Append(nil, m)
	msg, n, err := NextMessage(raw, 0)
	if err != nil || n != len(raw) {
		t.Fatalf("framing %T: %v", m, err)
	}
	return msg
}

func TestPassthroughStripsSCRAMPlus(t *testing.T) {
	p := NewPassthroughFor(0, nil)
	out, err := p.FromServer(msgOf(t, &pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"}}))
	if err != nil {
		t.Fatal(err)
	}
	want := Append(nil, &pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256"}})
	if !bytes.Equal(out, want) {
		t.Fatalf("forwarded %q, want %q", out, want)
	}
	// The client may not pick the mechanism that was removed.
	if _, err := p.FromClient(msgOf(t, &pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256-PLUS", Data: []byte("p=tls-server-end-point,,n=,r=x")})); err == nil {
		t.Fatal("SCRAM-SHA-256-PLUS response forwarded")
	}

	p = NewPassthroughFor(0, nil)
	_, err = p.FromServer(msgOf(t, &pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256-PLUS"}}))
	var ae *AuthError
	if !errors.As(err, &ae) || ae.Code != "28000" {
		t.Fatalf("PLUS only: %v", err)
	}
}

// A complete synthetic SCRAM exchange: what is forwarded, what is held.
func TestPassthroughHoldsAfterOk(t *testing.T) {
	p := NewPassthroughFor(0, nil)
	fwd := func(m pgproto3.BackendMessage) []byte {
		out, err := p.FromServer(msgOf(t, m))
		if err != nil {
			t.Fatalf("%T: %v", m, err)
		}
		return out
	}
	cli := func(m pgproto3.FrontendMessage) ([]byte, error) { return p.FromClient(msgOf(t, m)) }

	if _, err := cli(&pgproto3.PasswordMessage{Password: "early"}); err == nil {
		t.Fatal("response before any request forwarded")
	}
	if fwd(&pgproto3.NoticeResponse{Severity: "NOTICE", Message: "pre"}) == nil {
		t.Fatal("pre-auth notice not forwarded")
	}
	fwd(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256"}})
	if _, err := cli(&pgproto3.Query{String: "SELECT 1"}); err == nil {
		t.Fatal("query forwarded during auth")
	}
	if out, err := cli(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte("n,,n=,r=abc")}); err != nil || out == nil {
		t.Fatalf("initial response: %v", err)
	}
	if _, err := cli(&pgproto3.SASLResponse{Data: []byte("again")}); err == nil {
		t.Fatal("second response to one request forwarded")
	}
	fwd(&pgproto3.AuthenticationSASLContinue{Data: []byte("r=abcdef,s=c2FsdA==,i=4096")})
	if out, err := cli(&pgproto3.SASLResponse{Data: []byte("c=biws,r=abcdef,p=AAAA")}); err != nil || out == nil {
		t.Fatalf("response: %v", err)
	}
	fwd(&pgproto3.AuthenticationSASLFinal{Data: []byte("v=AAAA")})
	if p.Authenticated() {
		t.Fatal("authenticated before Ok")
	}
	if out := fwd(&pgproto3.AuthenticationOk{}); out != nil {
		t.Fatalf("AuthenticationOk forwarded: %q", out)
	}
	if !p.Authenticated() {
		t.Fatal("Ok not recorded")
	}
	for _, m := range []pgproto3.BackendMessage{
		&pgproto3.ParameterStatus{Name: "server_version", Value: "15"},
		&pgproto3.BackendKeyData{ProcessID: 7, SecretKey: []byte{1, 2, 3, 4}},
		&pgproto3.NoticeResponse{Severity: "NOTICE", Message: "post"},
	} {
		if out := fwd(m); out != nil {
			t.Fatalf("%T forwarded after Ok", m)
		}
	}
	if _, err := cli(&pgproto3.SASLResponse{Data: []byte("late")}); err == nil {
		t.Fatal("auth response after Ok forwarded")
	}
	if _, err := cli(&pgproto3.Query{String: "SELECT 1"}); err == nil {
		t.Fatal("query after Ok forwarded")
	}
	if out := fwd(&pgproto3.ReadyForQuery{TxStatus: 'I'}); out != nil || !p.Ready() {
		t.Fatal("ReadyForQuery")
	}
	r := p.Result()
	if r.Method != "scram-sha-256" || len(r.Params) != 1 || r.Key.ProcessID != 7 || len(r.Notices) != 1 || r.TxStatus != 'I' {
		t.Fatalf("%+v", r)
	}
	if _, err := p.FromServer(msgOf(t, &pgproto3.ReadyForQuery{TxStatus: 'I'})); err == nil {
		t.Fatal("message after ReadyForQuery accepted")
	}
	if _, err := p.FromClient(Message{Type: 'X'}); !errors.Is(err, ErrClientTerminated) {
		t.Fatal(err)
	}
}

func TestPassthroughErrors(t *testing.T) {
	// An error before Ok is forwarded and returned.
	p := NewPassthroughFor(0, nil)
	p.FromServer(msgOf(t, &pgproto3.AuthenticationMD5Password{Salt: [4]byte{1, 2, 3, 4}}))
	if _, err := p.FromClient(msgOf(t, &pgproto3.SASLResponse{Data: []byte("not a password")})); err == nil {
		t.Fatal("malformed password message forwarded")
	}
	p.FromClient(msgOf(t, &pgproto3.PasswordMessage{Password: "md5abc"}))
	out, err := p.FromServer(msgOf(t, &pgproto3.ErrorResponse{Severity: "FATAL", Code: "28P01", Message: "password authentication failed for user \"u\""}))
	var se *ServerError
	if !errors.As(err, &se) || se.Resp.Code != "28P01" || out == nil || out[0] != 'E' {
		t.Fatalf("out=%q err=%v", out, err)
	}
	// After Ok an error is returned but not forwarded.
	p = NewPassthroughFor(0, nil)
	p.FromServer(msgOf(t, &pgproto3.AuthenticationOk{}))
	out, err = p.FromServer(msgOf(t, &pgproto3.ErrorResponse{Severity: "FATAL", Code: "3D000", Message: "database \"x\" does not exist"}))
	if !errors.As(err, &se) || out != nil {
		t.Fatalf("out=%q err=%v", out, err)
	}
	if p.Result().Method != "trust" {
		t.Fatal(p.Result().Method)
	}
	for name, seq := range map[string][]pgproto3.BackendMessage{
		"DataRow after Ok":      {&pgproto3.AuthenticationOk{}, &pgproto3.DataRow{}},
		"params before Ok":      {&pgproto3.ParameterStatus{Name: "a", Value: "b"}},
		"two requests":          {&pgproto3.AuthenticationCleartextPassword{}, &pgproto3.AuthenticationCleartextPassword{}},
		"continue without sasl": {&pgproto3.AuthenticationSASLContinue{Data: []byte("x")}},
		"gss":                   {&pgproto3.AuthenticationGSS{}},
		"sspi":                  {&AuthenticationUnsupported{AuthType: 9}},
	} {
		p := NewPassthroughFor(0, nil)
		var err error
		for _, m := range seq {
			if _, err = p.FromServer(msgOf(t, m)); err != nil {
				break
			}
		}
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
