package proto

import (
	"bytes"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

const v32 = pgproto3.ProtocolVersion32

func npv(version uint32, opts ...string) *pgproto3.NegotiateProtocolVersion {
	return &pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: version, UnrecognizedOptions: opts}
}

// TestCheckNegotiate: what PostgreSQL 13-17 send a 3.2 client (3.0), what
// 18 sends a client with an unknown _pq_ option (3.2 and the option) pass;
// everything libpq 18 refuses is refused, naming the problem.
func TestCheckNegotiate(t *testing.T) {
	for _, tc := range []struct {
		name  string
		m     *pgproto3.NegotiateProtocolVersion
		asked uint32
		sent  []string
		want  string // "" ok, else part of the error
	}{
		{"13-17 to a 3.2 client", npv(pgproto3.ProtocolVersion30), v32, nil, ""},
		{"13-17 to a 3.2 client with an option", npv(pgproto3.ProtocolVersion30, "_pq_.x"), v32, []string{"_pq_.x"}, ""},
		{"18 refusing an option", npv(v32, "_pq_.x"), v32, []string{"_pq_.x", "_pq_.y"}, ""},
		{"3.0 client with an option", npv(pgproto3.ProtocolVersion30, "_pq_.x"), pgproto3.ProtocolVersion30, []string{"_pq_.x"}, ""},
		{"option never sent", npv(pgproto3.ProtocolVersion30, "_pq_.evil"), v32, nil, "never sent"},
		{"not a _pq_ option", npv(pgproto3.ProtocolVersion30, "user"), v32, []string{"user"}, "not a _pq_"},
		{"option twice", npv(pgproto3.ProtocolVersion30, "_pq_.x", "_pq_.x"), v32, []string{"_pq_.x"}, "twice"},
		{"higher than asked", npv(v32), pgproto3.ProtocolVersion30, nil, "higher"},
		{"pre-3.0", npv(2 << 16), v32, nil, "older than 3.0"},
		{"version 0 (minor only)", npv(0), v32, nil, "older than 3.0"},
		{"3.1", npv(3<<16 | 1), v32, nil, "3.1"},
		{"no change", npv(v32), v32, nil, "no change"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckNegotiate(tc.m, tc.asked, tc.sent)
			if tc.want == "" && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want) || !isProtocolError(err)) {
				t.Fatalf("want a ProtocolError naming %q, got %v", tc.want, err)
			}
		})
	}
}

// TestPassthroughNegotiation: the relay forwards a valid
// NegotiateProtocolVersion once, refuses a second one or one after the first
// authentication request, and ends the login when the database accepted a
// _pq_ option (it did not list it) that pgmfa cannot carry.
func TestPassthroughNegotiation(t *testing.T) {
	params := []StartupParam{{"user", "u"}, {"_pq_.x", "1"}}
	from := func(p *Passthrough, msgs ...pgproto3.BackendMessage) ([]byte, error) {
		var out []byte
		for _, m := range msgs {
			raw := Append(nil, m)
			msg, _, err := NextMessage(raw, 0)
			if err != nil {
				t.Fatal(err)
			}
			b, err := p.FromServer(msg)
			out = append(out, b...)
			if err != nil {
				return out, err
			}
		}
		return out, nil
	}
	p := NewPassthroughFor(v32, params)
	out, err := from(p, npv(pgproto3.ProtocolVersion30, "_pq_.x"), &pgproto3.AuthenticationCleartextPassword{})
	if err != nil || !bytes.HasPrefix(out, Append(nil, npv(pgproto3.ProtocolVersion30, "_pq_.x"))) {
		t.Fatalf("valid negotiation: %q %v", out, err)
	}
	if r := p.Result(); r.Negotiate == nil || !r.NegotiateSent {
		t.Fatalf("Result: %+v", r)
	}
	for name, msgs := range map[string][]pgproto3.BackendMessage{
		"accepted option": {&pgproto3.AuthenticationCleartextPassword{}},
		"second NPV":      {npv(pgproto3.ProtocolVersion30, "_pq_.x"), npv(pgproto3.ProtocolVersion30, "_pq_.x")},
		"NPV after auth":  {npv(pgproto3.ProtocolVersion30, "_pq_.x"), &pgproto3.AuthenticationCleartextPassword{}, npv(pgproto3.ProtocolVersion30, "_pq_.x")},
	} {
		_, err := from(NewPassthroughFor(v32, params), msgs...)
		if err == nil || !isProtocolError(err) {
			t.Errorf("%s: want a ProtocolError, got %v", name, err)
		}
	}
	// A 3.0 client without options (NewPassthrough) must never be sent one.
	if _, err := from(NewPassthroughFor(0, nil), npv(pgproto3.ProtocolVersion30)); err == nil {
		t.Fatal("NegotiateProtocolVersion to a plain 3.0 client was relayed")
	}
}

// TestAppendReadyReplaysNegotiation: --auth password holds the database's
// NegotiateProtocolVersion and sends it ahead of AuthenticationOk; a relay
// that already forwarded it does not send it twice.
func TestAppendReadyReplaysNegotiation(t *testing.T) {
	n := npv(pgproto3.ProtocolVersion30)
	r := LoginResult{Negotiate: n}
	want := append(Append(nil, n), Append(nil, &pgproto3.AuthenticationOk{})...)
	if got := r.AppendReady(nil, nil); !bytes.HasPrefix(got, want) {
		t.Fatalf("held negotiation not replayed first: %q", got)
	}
	r.NegotiateSent = true
	if got := r.AppendReady(nil, nil); !bytes.HasPrefix(got, Append(nil, &pgproto3.AuthenticationOk{})) {
		t.Fatalf("forwarded negotiation sent again: %q", got)
	}
}

// FuzzNegotiate: for any NegotiateProtocolVersion body and any request, an
// accepted message never offers more than was asked, never 3.1 or below
// 3.0, and names only _pq_ options the client sent, each once.
func FuzzNegotiate(f *testing.F) {
	f.Add(Append(nil, npv(pgproto3.ProtocolVersion30, "_pq_.x"))[5:], uint16(2), "_pq_.x\x00_pq_.y")
	f.Add(Append(nil, npv(v32))[5:], uint16(0), "")
	f.Add([]byte{0, 3, 0, 0, 0, 0, 0, 1, '_', 0}, uint16(2), "_")
	f.Fuzz(func(t *testing.T, body []byte, askedMinor uint16, sentList string) {
		var m pgproto3.NegotiateProtocolVersion
		if err := m.Decode(body); err != nil {
			return
		}
		asked := uint32(3)<<16 | uint32(askedMinor)
		var sent []string
		if sentList != "" {
			sent = strings.Split(sentList, "\x00")
		}
		if err := CheckNegotiate(&m, asked, sent); err != nil {
			if !isProtocolError(err) {
				t.Fatalf("not a ProtocolError: %v", err)
			}
			return
		}
		v := m.NewestMinorProtocol
		if v > asked || v < pgproto3.ProtocolVersion30 || v == 3<<16|1 {
			t.Fatalf("accepted version %#x for %#x", v, asked)
		}
		seen := map[string]bool{}
		for _, o := range m.UnrecognizedOptions {
			if !strings.HasPrefix(o, "_pq_.") || !contains(sent, o) || seen[o] {
				t.Fatalf("accepted option %q (sent %q)", o, sent)
			}
			seen[o] = true
		}
		if v == asked && len(m.UnrecognizedOptions) == 0 {
			t.Fatal("accepted a negotiation that changes nothing")
		}
	})
}
