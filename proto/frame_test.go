package proto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

func startupBytes(t testing.TB, version uint32, params map[string]string) []byte {
	t.Helper()
	return Append(nil, &pgproto3.StartupMessage{ProtocolVersion: version, Parameters: params})
}

func rawStartup(version uint32, body string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(8+len(body)))
	b = binary.BigEndian.AppendUint32(b, version)
	return append(b, body...)
}

func isProtocolError(err error) bool {
	var pe *ProtocolError
	return errors.As(err, &pe)
}

func TestNextStartup(t *testing.T) {
	sm := startupBytes(t, pgproto3.ProtocolVersion32, map[string]string{"user": "bob", "database": "db"})
	for i := 0; i < len(sm); i++ {
		msg, n, err := NextStartup(sm[:i])
		if msg != nil || n != 0 || err != nil {
			t.Fatalf("prefix %d: %v %d %v, want incomplete", i, msg, n, err)
		}
	}
	msg, n, err := NextStartup(append(sm, 'X'))
	if err != nil || n != len(sm) {
		t.Fatalf("n=%d err=%v", n, err)
	}
	got := msg.(*StartupMessage)
	if u, _ := got.Get("user"); got.ProtocolVersion != pgproto3.ProtocolVersion32 || u != "bob" {
		t.Fatalf("%+v", got)
	}
	if d, _ := got.Get("database"); d != "db" {
		t.Fatalf("%+v", got)
	}

	ssl := Append(nil, &pgproto3.SSLRequest{})
	if msg, n, err := NextStartup(ssl); err != nil || n != 8 {
		t.Fatalf("ssl: %v", err)
	} else if _, ok := msg.(*pgproto3.SSLRequest); !ok {
		t.Fatalf("ssl: %T", msg)
	}
	gss := Append(nil, &pgproto3.GSSEncRequest{})
	if msg, _, err := NextStartup(gss); err != nil {
		t.Fatal(err)
	} else if _, ok := msg.(*pgproto3.GSSEncRequest); !ok {
		t.Fatalf("gss: %T", msg)
	}
	for _, key := range [][]byte{{1, 2, 3, 4}, bytes.Repeat([]byte{7}, 32), bytes.Repeat([]byte{9}, 256)} {
		cr := Append(nil, &pgproto3.CancelRequest{ProcessID: 42, SecretKey: key})
		msg, _, err := NextStartup(cr)
		if err != nil {
			t.Fatalf("cancel %d: %v", len(key), err)
		}
		c := msg.(*pgproto3.CancelRequest)
		if c.ProcessID != 42 || !bytes.Equal(c.SecretKey, key) {
			t.Fatalf("cancel: %+v", c)
		}
	}
	empty := rawStartup(pgproto3.ProtocolVersion30, "\x00")
	if msg, _, err := NextStartup(empty); err != nil || len(msg.(*StartupMessage).Params) != 0 {
		t.Fatalf("empty startup: %v", err)
	}
}

// TestNextStartupKeepsOrderAndDuplicates: parameters come out in the
// client's order, repeated names included; Get reads the last one, as
// PostgreSQL does; encoding gives back the same bytes.
func TestNextStartupKeepsOrderAndDuplicates(t *testing.T) {
	in := rawStartup(pgproto3.ProtocolVersion30, "user\x00a\x00search_path\x00x\x00SEARCH_PATH\x00y\x00user\x00b\x00zz\x00\x00aa\x001\x00\x00")
	msg, n, err := NextStartup(in)
	if err != nil || n != len(in) {
		t.Fatalf("n=%d err=%v", n, err)
	}
	sm := msg.(*StartupMessage)
	want := []StartupParam{{"user", "a"}, {"search_path", "x"}, {"SEARCH_PATH", "y"}, {"user", "b"}, {"zz", ""}, {"aa", "1"}}
	if len(sm.Params) != len(want) {
		t.Fatalf("%+v", sm.Params)
	}
	for i := range want {
		if sm.Params[i] != want[i] {
			t.Fatalf("param %d: %+v, want %+v", i, sm.Params[i], want[i])
		}
	}
	if u, ok := sm.Get("user"); !ok || u != "b" {
		t.Fatalf("user %q: PostgreSQL takes the last", u)
	}
	if _, ok := sm.Get("database"); ok {
		t.Fatal("database found")
	}
	if out := Append(nil, sm); !bytes.Equal(out, in) {
		t.Fatalf("re-encoded\n%q\nwant\n%q", out, in)
	}
	for _, bad := range []StartupParam{{"", "x"}, {"a\x00b", "x"}, {"a", "x\x00"}} {
		if _, err := (&StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Params: []StartupParam{bad}}).Encode(nil); err == nil {
			t.Fatalf("%q encoded", bad)
		}
	}
}

func TestNextStartupRejects(t *testing.T) {
	huge := binary.BigEndian.AppendUint32(nil, 1<<31)
	cases := map[string][]byte{
		"short length":    {0, 0, 0, 4},
		"huge length":     huge, // refused from the header alone
		"just over limit": binary.BigEndian.AppendUint32(nil, MaxStartupPacketLen+1),
		"protocol 2.0":    rawStartup(2<<16, "user\x00x\x00\x00"),
		"protocol 3.1":    rawStartup(3<<16|1, "user\x00x\x00\x00"),
		"protocol 4.0":    rawStartup(4<<16, "user\x00x\x00\x00"),
		"no terminator":   rawStartup(pgproto3.ProtocolVersion30, "user\x00x\x00"),
		"missing value":   rawStartup(pgproto3.ProtocolVersion30, "user\x00"),
		"trailing bytes":  rawStartup(pgproto3.ProtocolVersion30, "user\x00x\x00\x00junk"),
		"long ssl":        rawStartup(sslRequestCode, "xxxx"),
		"short cancel":    rawStartup(cancelRequestCode, "\x00\x00\x00\x01"),
		"unknown code":    rawStartup(1234<<16|9999, ""),
		"bare empty":      rawStartup(pgproto3.ProtocolVersion30, ""),
	}
	for name, b := range cases {
		msg, n, err := NextStartup(b)
		if !isProtocolError(err) || msg != nil || n != 0 {
			t.Errorf("%s: msg=%T n=%d err=%v, want ProtocolError", name, msg, n, err)
		}
	}
}

func TestNextMessage(t *testing.T) {
	q := Append(nil, &pgproto3.Query{String: "SELECT 1"})
	for i := 0; i < len(q); i++ {
		if _, n, err := NextMessage(q[:i], 0); n != 0 || err != nil {
			t.Fatalf("prefix %d: n=%d err=%v", i, n, err)
		}
	}
	m, n, err := NextMessage(append(q, 'Z'), 0)
	if err != nil || n != len(q) || m.Type != 'Q' || string(m.Body) != "SELECT 1\x00" {
		t.Fatalf("%q %d %v", m.Type, n, err)
	}
	if !bytes.Equal(m.Raw(), q) || !bytes.Equal(m.AppendRaw([]byte("x")), append([]byte("x"), q...)) {
		t.Fatal("Raw/AppendRaw")
	}
	// The body is capped: appending to it must not overwrite what follows.
	buf := append(append([]byte(nil), q...), 'Z', 'Z')
	m, _, _ = NextMessage(buf, 0)
	_ = append(m.Body, 'x')
	if buf[len(q)] != 'Z' {
		t.Fatal("Body aliases beyond its message")
	}
	for name, c := range map[string]struct {
		b   []byte
		max int
	}{
		"length 3":   {[]byte{'Q', 0, 0, 0, 3}, 0},
		"over max":   {[]byte{'Q', 0, 0, 0, 100}, 100},
		"huge claim": {[]byte{'Q', 0x7f, 0xff, 0xff, 0xff}, 0},
		"negative":   {[]byte{'Q', 0xff, 0xff, 0xff, 0xff}, 0},
	} {
		if _, n, err := NextMessage(c.b, c.max); !isProtocolError(err) || n != 0 {
			t.Errorf("%s: n=%d err=%v", name, n, err)
		}
	}
	if _, n, err := NextMessage([]byte{'Q', 0, 0, 0, 99}, 100); err != nil || n != 0 {
		t.Errorf("exactly max must be allowed (incomplete here): %v", err)
	}
}

func TestDecodeBackend(t *testing.T) {
	msgs := []pgproto3.BackendMessage{
		&pgproto3.AuthenticationOk{},
		&pgproto3.AuthenticationCleartextPassword{},
		&pgproto3.AuthenticationMD5Password{Salt: [4]byte{1, 2, 3, 4}},
		&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256"}},
		&pgproto3.AuthenticationSASLContinue{Data: []byte("r=x")},
		&pgproto3.AuthenticationSASLFinal{Data: []byte("v=x")},
		&pgproto3.AuthenticationGSS{},
		&AuthenticationUnsupported{AuthType: 9},
		&pgproto3.ParameterStatus{Name: "a", Value: "b"},
		&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{1, 2, 3, 4}},
		&pgproto3.ReadyForQuery{TxStatus: 'I'},
		&pgproto3.ErrorResponse{Severity: "FATAL", Code: "28P01", Message: "no"},
		&pgproto3.NoticeResponse{Severity: "NOTICE", Code: "00000", Message: "hi"},
		&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: []string{"_pq_.x"}},
	}
	for _, want := range msgs {
		raw := Append(nil, want)
		m, _, err := NextMessage(raw, 0)
		if err != nil {
			t.Fatal(err)
		}
		got, err := DecodeBackend(m)
		if err != nil {
			t.Fatalf("%T: %v", want, err)
		}
		if re := Append(nil, got); !bytes.Equal(re, raw) {
			t.Fatalf("%T: round trip %q != %q", want, re, raw)
		}
	}
	for name, m := range map[string]Message{
		"DataRow":      {Type: 'D', Body: []byte{0, 0}},
		"unknown auth": {Type: 'R', Body: []byte{0, 0, 0, 99}},
		"short auth":   {Type: 'R', Body: []byte{0}},
		"bad ok":       {Type: 'R', Body: []byte{0, 0, 0, 0, 1}},
		"bad Z":        {Type: 'Z', Body: nil},
		"bad K":        {Type: 'K', Body: []byte{1}},
	} {
		if _, err := DecodeBackend(m); !isProtocolError(err) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestErrorFor(t *testing.T) {
	e := ErrorFor(&AuthError{Code: "28000", Message: "m", Hint: "h"})
	if e.Severity != "FATAL" || e.Code != "28000" || e.Message != "m" || e.Hint != "h" {
		t.Fatalf("%+v", e)
	}
	if e := ErrorFor(protoErrorf("x")); e.Code != "08P01" || e.Message != "x" {
		t.Fatalf("%+v", e)
	}
	resp := &pgproto3.ErrorResponse{Severity: "FATAL", Code: "28P01", Message: "password authentication failed for user \"x\""}
	se := &ServerError{Resp: resp}
	if ErrorFor(se) != resp || se.Error() != `28P01: password authentication failed for user "x"` {
		t.Fatal(se.Error())
	}
	if e := ErrorFor(errors.New("secret internal detail")); e.Code != "08P01" || bytes.Contains([]byte(e.Message), []byte("secret")) {
		t.Fatalf("%+v", e)
	}
}

func TestAppendReady(t *testing.T) {
	notice := Append(nil, &pgproto3.NoticeResponse{Severity: "NOTICE", Code: "00000", Message: "n"})
	r := &LoginResult{
		Params:   []pgproto3.ParameterStatus{{Name: "a", Value: "1"}, {Name: "b", Value: "2"}},
		Key:      &pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{1, 1, 1, 1}},
		Notices:  [][]byte{notice},
		TxStatus: 'I',
	}
	key := &pgproto3.BackendKeyData{ProcessID: 9, SecretKey: []byte{9, 9, 9, 9}}
	want := Append(nil, &pgproto3.AuthenticationOk{}, &r.Params[0], &r.Params[1], key)
	want = append(want, notice...)
	want = Append(want, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	if got := r.AppendReady(nil, key); !bytes.Equal(got, want) {
		t.Fatalf("got %q\nwant %q", got, want)
	}
	// nil key: omitted, and the server's own key never leaks.
	got := r.AppendReady(nil, nil)
	if bytes.Contains(got, Append(nil, r.Key)) {
		t.Fatal("upstream key sent to the client")
	}
}
