package proto

import (
	"encoding/base64"
	"testing"
)

// The example exchanges of RFC 5802 §5 (SCRAM-SHA-1) and RFC 7677 §3
// (SCRAM-SHA-256), reproduced by the same client and server code that talks
// to PostgreSQL, with the RFCs' nonces injected.
var rfcExchanges = []struct {
	name                                               string
	h                                                  *scramHash
	password, clientNonce, serverNonce                 string
	salt                                               string
	iter                                               int
	clientFirst, serverFirst, clientFinal, serverFinal string
}{
	{
		name: "RFC5802-SHA1", h: scramSHA1, password: "pencil",
		clientNonce: "fyko+d2lbbFgONRv9qkxdawL", serverNonce: "3rfcNHYJY1ZVvWVs7j",
		salt: "QSXCR+Q6sek8bf92", iter: 4096,
		clientFirst: "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
		serverFirst: "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
		clientFinal: "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
		serverFinal: "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
	},
	{
		name: "RFC7677-SHA256", h: scramSHA256, password: "pencil",
		clientNonce: "rOprNGfwEbeRWgbNEkqO", serverNonce: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
		salt: "W22ZaJ0SNY7soEsUEjb6gQ==", iter: 4096,
		clientFirst: "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
		serverFirst: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
		clientFinal: "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
		serverFinal: "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
	},
}

func TestSCRAMRFCClient(t *testing.T) {
	for _, x := range rfcExchanges {
		t.Run(x.name, func(t *testing.T) {
			c := &scramClient{h: x.h, password: x.password, clientNonce: x.clientNonce, maxIterations: DefaultMaxSCRAMIterations}
			// The proxy sends an empty SCRAM user, as libpq does; the RFCs'
			// examples name "user", and the proofs cover client-first-bare,
			// so the exchange continues from the RFC's own first message.
			if got, want := c.clientFirst(), "n,,n=,r="+x.clientNonce; got != want {
				t.Fatalf("client-first = %q, want %q", got, want)
			}
			c.clientFirstBare = x.clientFirst[len(gs2NoCB):]
			final, err := c.clientFinal(x.serverFirst)
			if err != nil {
				t.Fatal(err)
			}
			if final != x.clientFinal {
				t.Fatalf("client-final = %q, want %q", final, x.clientFinal)
			}
			if err := c.verifyServerFinal(x.serverFinal); err != nil {
				t.Fatalf("server-final rejected: %v", err)
			}
			// One flipped bit in the server signature must fail.
			sig, _ := base64.StdEncoding.DecodeString(x.serverFinal[2:])
			sig[0] ^= 1
			if err := c.verifyServerFinal("v=" + base64.StdEncoding.EncodeToString(sig)); err == nil {
				t.Fatal("tampered server signature accepted")
			}
		})
	}
}

func TestSCRAMRFCServer(t *testing.T) {
	for _, x := range rfcExchanges {
		t.Run(x.name, func(t *testing.T) {
			salt, _ := base64.StdEncoding.DecodeString(x.salt)
			_, keys := x.h.keys(x.h.saltedPassword(x.password, salt, x.iter))
			s := &scramServer{h: x.h, salt: salt, iter: x.iter, keys: keys, nonce: x.serverNonce}
			first, err := s.serverFirstMsg(x.clientFirst)
			if err != nil {
				t.Fatal(err)
			}
			if first != x.serverFirst {
				t.Fatalf("server-first = %q, want %q", first, x.serverFirst)
			}
			final, ok, err := s.serverFinalMsg(x.clientFinal)
			if err != nil || !ok {
				t.Fatalf("client proof refused: ok=%v err=%v", ok, err)
			}
			if final != x.serverFinal {
				t.Fatalf("server-final = %q, want %q", final, x.serverFinal)
			}
		})
	}
}

func TestSCRAMServerRefusals(t *testing.T) {
	x := rfcExchanges[1]
	salt, _ := base64.StdEncoding.DecodeString(x.salt)
	_, keys := x.h.keys(x.h.saltedPassword(x.password, salt, x.iter))
	newSrv := func() *scramServer {
		s := &scramServer{h: x.h, salt: salt, iter: x.iter, keys: keys, nonce: x.serverNonce}
		if _, err := s.serverFirstMsg(x.clientFirst); err != nil {
			t.Fatal(err)
		}
		return s
	}
	// Wrong password: a well-formed proof that does not match.
	c := &scramClient{h: x.h, password: "wrong", clientNonce: x.clientNonce, maxIterations: 1 << 20}
	c.clientFirst()
	c.clientFirstBare = x.clientFirst[len(gs2NoCB):] // the message the server saw
	final, err := c.clientFinal(x.serverFirst)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := newSrv().serverFinalMsg(final); ok || err != nil {
		t.Fatalf("wrong password: ok=%v err=%v, want refusal without error", ok, err)
	}
	for name, msg := range map[string]string{
		"nonce":   "c=biws,r=rOprNGfwEbeRWgbNEkqOXXXX,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
		"cbind":   "c=eSws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
		"proof":   "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=AAAA",
		"garbage": "hello",
	} {
		if _, ok, err := newSrv().serverFinalMsg(msg); ok || err == nil {
			t.Errorf("%s: ok=%v err=%v, want error", name, ok, err)
		}
	}
	for name, msg := range map[string]string{
		"channel binding": "p=tls-server-end-point,,n=,r=abc",
		"authzid":         "n,a=admin,n=,r=abc",
		"extension":       "n,,m=ext,n=,r=abc",
		"no nonce":        "n,,n=",
		"bad flag":        "x,,n=,r=abc",
	} {
		s := &scramServer{h: x.h, salt: salt, iter: x.iter, keys: keys, nonce: "srv"}
		if _, err := s.serverFirstMsg(msg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestSCRAMClientRefusals(t *testing.T) {
	for name, sf := range map[string]string{
		"nonce not extended": "r=other,s=QSXCR+Q6sek8bf92,i=4096",
		"nonce not longer":   "r=abc,s=QSXCR+Q6sek8bf92,i=4096",
		"bad salt":           "r=abcdef,s=!!!,i=4096",
		"zero iterations":    "r=abcdef,s=QSXCR+Q6sek8bf92,i=0",
		"too many":           "r=abcdef,s=QSXCR+Q6sek8bf92,i=2000000",
		"extension":          "m=x,r=abcdef,s=QSXCR+Q6sek8bf92,i=1",
	} {
		c := &scramClient{h: scramSHA256, password: "p", clientNonce: "abc", maxIterations: 1 << 20}
		c.clientFirst()
		if _, err := c.clientFinal(sf); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	c := &scramClient{h: scramSHA256, password: "p", clientNonce: "abc", maxIterations: 1 << 20}
	if err := c.verifyServerFinal("v=AAAA"); err == nil {
		t.Error("server-final before server-first accepted")
	}
}

func TestVerifierFormats(t *testing.T) {
	salt, _ := base64.StdEncoding.DecodeString("W22ZaJ0SNY7soEsUEjb6gQ==")
	v := NewSCRAMVerifier("pencil", salt, 4096)
	pv, err := ParseVerifier(v)
	if err != nil {
		t.Fatal(err)
	}
	if pv.String() != v || !pv.IsSCRAM() {
		t.Fatalf("round trip: %q -> %q", v, pv.String())
	}
	if !pv.checkCleartext("user", "pencil") || pv.checkCleartext("user", "pencil2") {
		t.Fatal("cleartext check against SCRAM verifier")
	}
	m := NewMD5Verifier("bob", "secret")
	if m != "md5"+md5Hex([]byte("secretbob")) {
		t.Fatalf("md5 verifier %q", m)
	}
	pm, err := ParseVerifier(m)
	if err != nil || pm.IsSCRAM() || !pm.checkCleartext("bob", "secret") || pm.checkCleartext("bob", "x") {
		t.Fatalf("md5 verifier: %v", err)
	}
	for _, bad := range []string{"", "secret", "md5xyz", "md5" + "0123456789abcdef0123456789abcdeg",
		"SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB", "SCRAM-SHA-256$x:c2FsdA==$" + v[len(v)-89:], "SCRAM-SHA-1$4096:a$b:c"} {
		if _, err := ParseVerifier(bad); err == nil {
			t.Errorf("ParseVerifier(%q) accepted", bad)
		}
	}
}
