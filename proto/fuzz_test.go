package proto

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Seed corpora live in testdata/fuzz/<Name>/; `go test` replays them.

func FuzzNextStartup(f *testing.F) {
	f.Add(Append(nil, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: map[string]string{"user": "u"}}))
	f.Add(Append(nil, &pgproto3.SSLRequest{}))
	f.Fuzz(func(t *testing.T, data []byte) {
		msg, n, err := NextStartup(data)
		if err != nil {
			if msg != nil || n != 0 || !isProtocolError(err) {
				t.Fatalf("error with result: %T %d %v", msg, n, err)
			}
			return
		}
		if n == 0 {
			// Incomplete is only allowed for a sane claimed length.
			if msg != nil {
				t.Fatal("message without length")
			}
			if len(data) >= 4 {
				l := binary.BigEndian.Uint32(data)
				if l < 8 || l > MaxStartupPacketLen || int(l) <= len(data) {
					t.Fatalf("incomplete with claimed length %d and %d bytes", l, len(data))
				}
			}
			return
		}
		if n > len(data) || n != int(binary.BigEndian.Uint32(data)) || msg == nil {
			t.Fatalf("n=%d len=%d", n, len(data))
		}
		if sm, ok := msg.(*StartupMessage); ok {
			// Round trip: what we would forward is the packet we got, byte
			// for byte, and parses to the same thing.
			re, err := sm.Encode(nil)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(re, data[:n]) {
				t.Fatalf("re-encoded startup differs:\n%q\n%q", re, data[:n])
			}
			msg2, _, err := NextStartup(re)
			if err != nil {
				t.Fatalf("re-encoded startup refused: %v", err)
			}
			sm2 := msg2.(*StartupMessage)
			if len(sm2.Params) != len(sm.Params) {
				t.Fatal("parameters changed in a round trip")
			}
			for i := range sm.Params {
				if sm2.Params[i] != sm.Params[i] {
					t.Fatalf("parameter %d changed", i)
				}
			}
		}
	})
}

func FuzzNextMessage(f *testing.F) {
	f.Add(Append(nil, &pgproto3.Query{String: "SELECT 1"}), 0)
	f.Add([]byte{'p', 0x7f, 0xff, 0xff, 0xff}, 100)
	f.Fuzz(func(t *testing.T, data []byte, max int) {
		m, n, err := NextMessage(data, max)
		if max <= 0 {
			max = DefaultMaxMessageLen
		}
		if err != nil {
			if n != 0 || !isProtocolError(err) {
				t.Fatal(err)
			}
			return
		}
		if n == 0 {
			if len(data) >= 5 {
				l := int64(binary.BigEndian.Uint32(data[1:]))
				if l < 4 || l+1 > int64(max) || int(l)+1 <= len(data) {
					t.Fatalf("incomplete with claim %d", l)
				}
			}
			return
		}
		if n > len(data) || n > max || !bytes.Equal(m.Raw(), data[:n]) {
			t.Fatal("bad framing")
		}
		if m.Type == 'R' || m.Type == 'E' || m.Type == 'S' {
			DecodeBackend(m) // must not panic
		}
	})
}

// fuzzSteps splits fuzz data into messages: each step is a direction byte
// (low bit: 0 server, 1 client) followed by one framed message.
func fuzzSteps(data []byte, step func(fromClient bool, m Message) bool) {
	for len(data) > 1 {
		dir := data[0]&1 == 1
		m, n, err := NextMessage(data[1:], 4096)
		if err != nil || n == 0 {
			return
		}
		data = data[1+n:]
		if !step(dir, m) {
			return
		}
	}
}

func seedSteps(steps ...any) []byte {
	var b []byte
	for _, s := range steps {
		switch s := s.(type) {
		case pgproto3.BackendMessage:
			b = Append(append(b, 0), s)
		case pgproto3.FrontendMessage:
			b = Append(append(b, 1), s)
		}
	}
	return b
}

func FuzzPassthrough(f *testing.F) {
	f.Add(seedSteps(
		&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"}},
		&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte("n,,n=,r=abc")},
		&pgproto3.AuthenticationSASLContinue{Data: []byte("r=abcd,s=AAAA,i=1")},
		&pgproto3.SASLResponse{Data: []byte("c=biws,r=abcd,p=AAAA")},
		&pgproto3.AuthenticationSASLFinal{Data: []byte("v=AAAA")},
		&pgproto3.AuthenticationOk{},
		&pgproto3.Query{String: "SELECT 1"},
		&pgproto3.ParameterStatus{Name: "a", Value: "b"},
		&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{1, 2, 3, 4}},
		&pgproto3.ReadyForQuery{TxStatus: 'I'}))
	f.Add(seedSteps(&pgproto3.AuthenticationMD5Password{}, &pgproto3.PasswordMessage{Password: "md5x"},
		&pgproto3.ErrorResponse{Code: "28P01"}))
	f.Fuzz(func(t *testing.T, data []byte) {
		p := NewPassthroughFor(0, nil)
		fuzzSteps(data, func(fromClient bool, m Message) bool {
			authed := p.Authenticated()
			if fromClient {
				out, err := p.FromClient(m)
				if err != nil {
					return true // the caller would close; keep probing the machine
				}
				if authed || m.Type != 'p' || !bytes.Equal(out, m.Raw()) {
					t.Fatalf("forwarded client %q (authed=%v)", m.Type, authed)
				}
				return true
			}
			out, err := p.FromServer(m)
			if authed && out != nil {
				t.Fatalf("forwarded server %q after AuthenticationOk", m.Type)
			}
			if out != nil {
				rm, n, ferr := NextMessage(out, 0)
				if ferr != nil || n != len(out) {
					t.Fatal("forwarded bytes are not one message")
				}
				bm, derr := DecodeBackend(rm)
				if derr != nil {
					t.Fatalf("forwarded undecodable %q", rm.Type)
				}
				switch bm := bm.(type) {
				case *pgproto3.AuthenticationOk, *pgproto3.ParameterStatus, *pgproto3.BackendKeyData, *pgproto3.ReadyForQuery:
					t.Fatalf("forwarded %T", bm)
				case *pgproto3.AuthenticationSASL:
					for _, mech := range bm.AuthMechanisms {
						if mech == mechSCRAMPlus {
							t.Fatal("forwarded SCRAM-SHA-256-PLUS")
						}
					}
				}
			}
			return err == nil
		})
	})
}

// zeroReader is deterministic "randomness" for fuzzing.
type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func FuzzUpstreamLogin(f *testing.F) {
	nonce := base64.StdEncoding.EncodeToString(make([]byte, scramNonceLen))
	f.Add(seedSteps(
		&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256"}},
		&pgproto3.AuthenticationSASLContinue{Data: []byte("r=" + nonce + "srv,s=c2FsdA==,i=2")},
		&pgproto3.AuthenticationSASLFinal{Data: []byte("v=AAAA")},
		&pgproto3.AuthenticationOk{}, &pgproto3.ReadyForQuery{TxStatus: 'I'}))
	f.Add(seedSteps(&pgproto3.AuthenticationMD5Password{Salt: [4]byte{1, 2, 3, 4}}, &pgproto3.AuthenticationOk{},
		&pgproto3.ParameterStatus{Name: "a", Value: "b"}, &pgproto3.NoticeResponse{Message: "n"}, &pgproto3.ReadyForQuery{TxStatus: 'I'}))
	f.Add(seedSteps(&pgproto3.AuthenticationOk{}, &pgproto3.ErrorResponse{Code: "3D000"}))
	f.Fuzz(func(t *testing.T, data []byte) {
		u := NewUpstreamLogin(UpstreamConfig{User: "u", Password: "pencil", Rand: zeroReader{}, MaxSCRAMIterations: 64})
		sawOk, sawSASL, sawFinal := false, false, false
		fuzzSteps(data, func(_ bool, m Message) bool {
			bm, err := DecodeBackend(m)
			if err != nil {
				return true
			}
			_, done, err := u.Handle(bm)
			if err != nil {
				if _, _, err2 := u.Handle(&pgproto3.ReadyForQuery{TxStatus: 'I'}); err2 == nil {
					t.Fatal("machine went on after an error")
				}
				return false
			}
			switch bm.(type) {
			case *pgproto3.AuthenticationOk:
				sawOk = true
			case *pgproto3.AuthenticationSASL:
				sawSASL = true
			case *pgproto3.AuthenticationSASLFinal:
				sawFinal = true
			}
			if sawOk && sawSASL && !sawFinal {
				t.Fatal("Ok accepted in the middle of SCRAM")
			}
			if done && !sawOk {
				t.Fatal("done without AuthenticationOk")
			}
			return !done
		})
	})
}

func FuzzServerLogin(f *testing.F) {
	f.Add(byte(3), seedSteps(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte("n,,n=,r=abc")},
		&pgproto3.SASLResponse{Data: []byte("c=biws,r=abcAAAAAAAAAAAAAAAAAAAAAAAA,p=AAAA")}))
	f.Add(byte(2), seedSteps(&pgproto3.PasswordMessage{Password: "md5abc"}))
	f.Add(byte(1), seedSteps(&pgproto3.PasswordMessage{Password: "pencil"}))
	roles := NewRoles()
	roles.Set("scram", NewSCRAMVerifier("pencil", []byte("salt"), 2))
	roles.Set("md5", NewMD5Verifier("md5", "pencil"))
	methods := []string{MethodTrust, MethodPassword, MethodMD5, MethodSCRAM, "bogus"}
	users := []string{"scram", "md5", "nobody"}
	f.Fuzz(func(t *testing.T, sel byte, data []byte) {
		method := methods[int(sel)%len(methods)]
		user := users[int(sel/8)%len(users)]
		s := NewServerLogin(ServerConfig{Method: method, Roles: roles, User: user, Rand: zeroReader{}})
		_, done := s.Start()
		if done != (method == MethodTrust) {
			t.Fatalf("%s: done=%v at start", method, done)
		}
		fuzzSteps(data, func(_ bool, m Message) bool {
			out, done, err := s.Handle(m)
			if len(out) >= 9 && out[0] == 'R' && binary.BigEndian.Uint32(out[5:]) == authOk {
				t.Fatal("ServerLogin emitted AuthenticationOk")
			}
			if err != nil {
				var ae *AuthError
				var pe *ProtocolError
				if !errors.As(err, &ae) && !errors.As(err, &pe) && !errors.Is(err, ErrClientTerminated) {
					t.Fatalf("error type %T", err)
				}
				if _, d, err2 := s.Handle(m); err2 == nil || d {
					t.Fatal("machine went on after an error")
				}
				return false
			}
			if done && user == "nobody" {
				t.Fatal("unknown user authenticated")
			}
			if done && method == "bogus" {
				t.Fatal("unknown method authenticated")
			}
			return !done
		})
	})
}

func FuzzStripMFACode(f *testing.F) {
	f.Add(`-c a=b -c pgmfa.code=123456 --x=y`, "")
	f.Add(`-c\ pgmfa.code=1 -cpgmfa.code=1 \\`, "1")
	f.Add("--pgmfa.code=2\t-c", "3")
	f.Fuzz(func(t *testing.T, opts, bare string) {
		p := map[string]string{"options": opts, "user": "u"}
		if bare != "" {
			p["pgmfa.code"] = bare
		}
		code, err := StripMFACode(p)
		if err != nil {
			return
		}
		if bare != "" && code != bare {
			t.Fatalf("code %q, bare parameter %q", code, bare)
		}
		if _, ok := p["pgmfa.code"]; ok || p["user"] != "u" {
			t.Fatal("parameters mangled")
		}
		rest, ok := p["options"]
		if !ok {
			if strings.TrimLeft(rest, " \t\n\v\f\r") != "" {
				t.Fatal("options deleted with content")
			}
			return
		}
		// Idempotent: nothing pgmfa is left.
		p2 := map[string]string{"options": rest}
		if c2, _ := StripMFACode(p2); c2 != "" || p2["options"] != rest {
			t.Fatalf("second pass changed %q (code %q)", rest, c2)
		}
		// What is left is the input's tokens minus the removed ones, in order.
		in, out := splitOptions(opts), splitOptions(rest)
		j := 0
		for _, tok := range out {
			for j < len(in) && in[j].text != tok.text {
				j++
			}
			if j == len(in) {
				t.Fatalf("token %q of %q is not from %q", tok.text, rest, opts)
			}
			j++
		}
	})
}
