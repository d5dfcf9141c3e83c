package proto

import (
	"bytes"
	crand "crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// pair runs an UpstreamLogin (client side) against a ServerLogin in
// process. mutate may alter server bytes on their way to the client.
func pair(t *testing.T, method string, roles *Roles, user, password string, mutate func([]byte) []byte) (clientErr, serverErr error, serverDone bool) {
	t.Helper()
	s := NewServerLogin(ServerConfig{Method: method, Roles: roles, User: user, Rand: crand.Reader})
	c := NewUpstreamLogin(UpstreamConfig{User: user, Password: password, Rand: crand.Reader})
	toClient, done := s.Start()
	for i := 0; i < 10; i++ {
		if done {
			toClient = Append(toClient, &pgproto3.AuthenticationOk{}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
		}
		if mutate != nil {
			toClient = mutate(toClient)
		}
		var toServer []byte
		for len(toClient) > 0 {
			m, n, err := NextMessage(toClient, 0)
			if err != nil {
				t.Fatal(err)
			}
			toClient = toClient[n:]
			bm, err := DecodeBackend(m)
			if err != nil {
				t.Fatal(err)
			}
			out, cdone, err := c.Handle(bm)
			if err != nil {
				return err, nil, done
			}
			if cdone {
				return nil, nil, done
			}
			toServer = append(toServer, out...)
		}
		if done {
			t.Fatal("client not done after Ok and ReadyForQuery")
		}
		m, _, err := NextMessage(toServer, 0)
		if err != nil {
			t.Fatal(err)
		}
		var serr error
		toClient, done, serr = s.Handle(m)
		if serr != nil {
			return nil, serr, false
		}
	}
	t.Fatal("no end")
	return
}

func TestServerUpstreamInProcess(t *testing.T) {
	roles := NewRoles()
	roles.Set("alice", NewSCRAMVerifier("pencil", []byte("0123456789abcdef"), 4096))
	roles.Set("bob", NewMD5Verifier("bob", "pencil"))
	for _, method := range []string{MethodTrust, MethodPassword, MethodMD5, MethodSCRAM} {
		for _, user := range []string{"alice", "bob"} {
			t.Run(method+"/"+user, func(t *testing.T) {
				cerr, serr, done := pair(t, method, roles, user, "pencil", nil)
				if method == MethodSCRAM && user == "bob" {
					// An MD5 verifier cannot do SCRAM: refused like PostgreSQL.
					if ae := (*AuthError)(nil); !errors.As(serr, &ae) || ae.Code != "28P01" {
						t.Fatalf("scram with md5 verifier: %v %v", cerr, serr)
					}
					return
				}
				if cerr != nil || serr != nil || !done {
					t.Fatalf("client %v, server %v, done %v", cerr, serr, done)
				}
				_, serr, done = pair(t, method, roles, user, "pencil2", nil)
				if method == MethodTrust {
					return
				}
				want := fmt.Sprintf("password authentication failed for user %q", user)
				var ae *AuthError
				if !errors.As(serr, &ae) || ae.Code != "28P01" || ae.Message != want || done {
					t.Fatalf("wrong password: %v", serr)
				}
			})
		}
	}
}

func TestServerSignatureTampered(t *testing.T) {
	roles := NewRoles()
	roles.Set("alice", NewSCRAMVerifier("pencil", []byte("0123456789abcdef"), 4096))
	flipped := false
	cerr, _, _ := pair(t, MethodSCRAM, roles, "alice", "pencil", func(b []byte) []byte {
		m, n, _ := NextMessage(b, 0)
		if n > 0 && m.Type == 'R' && m.Body[3] == authSASLFinal {
			sig, _ := base64.StdEncoding.DecodeString(string(m.Body[6:]))
			sig[0] ^= 0x80
			flipped = true
			return Append(nil, &pgproto3.AuthenticationSASLFinal{Data: []byte("v=" + base64.StdEncoding.EncodeToString(sig))})
		}
		return b
	})
	var ae *AuthError
	if !flipped || !errors.As(cerr, &ae) {
		t.Fatalf("tampered signature: flipped=%v err=%v", flipped, cerr)
	}
	// A server that skips SASLFinal and says Ok must not be believed.
	cerr, _, _ = pair(t, MethodSCRAM, roles, "alice", "pencil", func(b []byte) []byte {
		m, n, _ := NextMessage(b, 0)
		if n > 0 && m.Type == 'R' && m.Body[3] == authSASLFinal {
			return Append(nil, &pgproto3.AuthenticationOk{})
		}
		return b
	})
	if !errors.As(cerr, &ae) {
		t.Fatalf("skipped SASLFinal: %v", cerr)
	}
}

// Unknown users get the same exchange as known ones: same salt on every
// attempt (no enumeration by salt), same failure.
func TestServerUnknownUser(t *testing.T) {
	roles := NewRoles()
	salts := map[string]bool{}
	for i := 0; i < 2; i++ {
		s := NewServerLogin(ServerConfig{Method: MethodSCRAM, Roles: roles, User: "ghost", Rand: crand.Reader})
		s.Start()
		out, _, err := s.Handle(msgOf(t, &pgproto3.SASLInitialResponse{AuthMechanism: mechSCRAM, Data: []byte("n,,n=,r=abcdef")}))
		if err != nil {
			t.Fatal(err)
		}
		m, _, _ := NextMessage(out, 0)
		attrs, _ := scramAttrs(string(m.Body[4:]))
		salts[attrs[1][1]] = true
		if attrs[2][1] != "4096" {
			t.Fatalf("iterations %q", attrs[2][1])
		}
	}
	if len(salts) != 1 {
		t.Fatalf("unknown user's salt changes between attempts: %v", salts)
	}
	_, serr, _ := pair(t, MethodSCRAM, roles, "ghost", "x", nil)
	var ae *AuthError
	if !errors.As(serr, &ae) || ae.Message != `password authentication failed for user "ghost"` {
		t.Fatal(serr)
	}
	_, serr, _ = pair(t, MethodMD5, roles, "ghost", "x", nil)
	if !errors.As(serr, &ae) || ae.Code != "28P01" {
		t.Fatal(serr)
	}
}

func TestServerLoginRefusals(t *testing.T) {
	roles := NewRoles()
	roles.Set("alice", NewSCRAMVerifier("pencil", []byte("0123456789abcdef"), 4096))
	start := func(method string) *ServerLogin {
		s := NewServerLogin(ServerConfig{Method: method, Roles: roles, User: "alice", Rand: crand.Reader})
		s.Start()
		return s
	}
	cases := map[string]struct {
		method string
		msgs   []pgproto3.FrontendMessage
		code   string
	}{
		"plus":         {MethodSCRAM, []pgproto3.FrontendMessage{&pgproto3.SASLInitialResponse{AuthMechanism: mechSCRAMPlus, Data: []byte("p=tls-server-end-point,,n=,r=a")}}, "08P01"},
		"cbind flag p": {MethodSCRAM, []pgproto3.FrontendMessage{&pgproto3.SASLInitialResponse{AuthMechanism: mechSCRAM, Data: []byte("p=tls-server-end-point,,n=,r=a")}}, "08P01"},
		"authzid":      {MethodSCRAM, []pgproto3.FrontendMessage{&pgproto3.SASLInitialResponse{AuthMechanism: mechSCRAM, Data: []byte("n,a=admin,n=,r=a")}}, "0A000"},
		"extension":    {MethodSCRAM, []pgproto3.FrontendMessage{&pgproto3.SASLInitialResponse{AuthMechanism: mechSCRAM, Data: []byte("n,,m=ext,n=,r=a")}}, "0A000"},
		"mechanism":    {MethodSCRAM, []pgproto3.FrontendMessage{&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-1", Data: []byte("n,,n=,r=a")}}, "08P01"},
		"query":        {MethodSCRAM, []pgproto3.FrontendMessage{&pgproto3.Query{String: "SELECT 1"}}, "08P01"},
		"malformed":    {MethodSCRAM, []pgproto3.FrontendMessage{&pgproto3.SASLInitialResponse{AuthMechanism: mechSCRAM, Data: []byte("garbage")}}, "08P01"},
		"nonce": {MethodSCRAM, []pgproto3.FrontendMessage{
			&pgproto3.SASLInitialResponse{AuthMechanism: mechSCRAM, Data: []byte("n,,n=,r=abc")},
			&pgproto3.SASLResponse{Data: []byte("c=biws,r=abcX,p=" + base64.StdEncoding.EncodeToString(make([]byte, 32)))}}, "08P01"},
		"empty password": {MethodPassword, []pgproto3.FrontendMessage{&pgproto3.PasswordMessage{}}, "28P01"},
	}
	for name, c := range cases {
		s := start(c.method)
		var err error
		for _, m := range c.msgs {
			if _, _, err = s.Handle(msgOf(t, m)); err != nil {
				break
			}
		}
		var ae *AuthError
		if !errors.As(err, &ae) || ae.Code != c.code {
			t.Errorf("%s: %v, want %s", name, err, c.code)
		}
	}
	s := start(MethodSCRAM)
	if _, _, err := s.Handle(Message{Type: 'X'}); !errors.Is(err, ErrClientTerminated) {
		t.Error(err)
	}
	if CheckServerMethod("ident") == nil || CheckServerMethod(MethodSCRAM) != nil {
		t.Error("CheckServerMethod")
	}
	bogus := NewServerLogin(ServerConfig{Method: "ident", Roles: roles, User: "alice"})
	if out, done := bogus.Start(); out != nil || done {
		t.Error("unknown method started")
	}
	if _, done, err := bogus.Handle(msgOf(t, &pgproto3.PasswordMessage{Password: "pencil"})); err == nil || done {
		t.Error("unknown method accepted a password")
	}
}

func TestRolesConcurrent(t *testing.T) {
	r := NewRoles()
	v := NewMD5Verifier("u", "p")
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < 200; j++ {
				user := fmt.Sprint("u", j%7)
				r.Set(user, v)
				r.Lookup(user)
				if j%3 == i%3 {
					r.Remove(user)
				}
			}
		}(i)
	}
	wg.Wait()
	if err := r.Set("x", "plaintext"); err == nil {
		t.Fatal("plaintext verifier accepted")
	}
	r.Set("x", v)
	if got, ok := r.Lookup("x"); !ok || !bytes.Equal([]byte(got.String()), []byte(v)) {
		t.Fatal("lookup")
	}
	r.Remove("x")
	if _, ok := r.Lookup("x"); ok {
		t.Fatal("removed user still there")
	}
}

// With SetMock, an unknown user's dummy exchange uses the server secret's
// salt (the same in another process holding the same secret, so a restart
// does not give unknown users away) and the configured iteration count
// (what real verifiers are made with).
func TestServerUnknownUserMock(t *testing.T) {
	first := func(roles *Roles, user string) (salt, iter string) {
		t.Helper()
		s := NewServerLogin(ServerConfig{Method: MethodSCRAM, Roles: roles, User: user, Rand: crand.Reader})
		s.Start()
		out, _, err := s.Handle(msgOf(t, &pgproto3.SASLInitialResponse{AuthMechanism: mechSCRAM, Data: []byte("n,,n=,r=abcdef")}))
		if err != nil {
			t.Fatal(err)
		}
		m, _, _ := NextMessage(out, 0)
		attrs, _ := scramAttrs(string(m.Body[4:]))
		return attrs[1][1], attrs[2][1]
	}
	secret := bytes.Repeat([]byte{7}, 32)
	a, b := NewRoles(), NewRoles()
	a.SetMock(secret, 10000)
	b.SetMock(secret, 10000)
	sa, ia := first(a, "ghost")
	sb, ib := first(b, "ghost")
	if sa != sb || ia != "10000" || ib != "10000" {
		t.Fatalf("same secret, other salt or count: %s/%s %s/%s", sa, ia, sb, ib)
	}
	if so, _ := first(a, "ghost2"); so == sa {
		t.Fatal("two unknown users share a salt")
	}
	c := NewRoles()
	c.SetMock(bytes.Repeat([]byte{8}, 32), 10000)
	if sc, _ := first(c, "ghost"); sc == sa {
		t.Fatal("another secret gives the same salt")
	}
	// A key made up by a dummy exchange before the secret was known gives
	// way to it (the first account was added while the proxy ran); a second
	// secret does not replace the first.
	d := NewRoles()
	first(d, "ghost")
	d.SetMock(secret, 10000)
	d.SetMock(bytes.Repeat([]byte{9}, 32), 10000)
	if sd, _ := first(d, "ghost"); sd != sa {
		t.Fatal("the server secret did not replace the made-up key")
	}
}
