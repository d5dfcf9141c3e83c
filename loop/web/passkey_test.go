package web

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/pquerna/otp"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/mfa/pgstore"
)

// softKey is a software WebAuthn authenticator (a passkey with user
// verification, "none" attestation, ES256), enough to drive the page's
// ceremonies from Go: the browser test (cmd/pgmfa) drives them from a
// real Chromium with its virtual authenticator.
type softKey struct {
	key    *ecdsa.PrivateKey
	id     []byte
	handle []byte // the user handle the RP gave at registration
	count  uint32
	rpID   string
	origin string
}

func newSoftKey(t *testing.T, rpID, origin string) *softKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id := make([]byte, 16)
	rand.Read(id)
	return &softKey{key: k, id: id, rpID: rpID, origin: origin}
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func (k *softKey) authData(attested bool) []byte {
	rp := sha256.Sum256([]byte(k.rpID))
	flags := byte(0x01 | 0x04) // user present, user verified
	var b bytes.Buffer
	b.Write(rp[:])
	if attested {
		flags |= 0x40
	}
	b.WriteByte(flags)
	binary.Write(&b, binary.BigEndian, k.count)
	if attested {
		b.Write(make([]byte, 16)) // AAGUID
		binary.Write(&b, binary.BigEndian, uint16(len(k.id)))
		b.Write(k.id)
		x, y := k.key.X.FillBytes(make([]byte, 32)), k.key.Y.FillBytes(make([]byte, 32))
		cose, _ := cbor.Marshal(map[int]any{1: 2, 3: -7, -1: 1, -2: x, -3: y})
		b.Write(cose)
	}
	return b.Bytes()
}

func (k *softKey) clientData(typ, challenge string) []byte {
	cd, _ := json.Marshal(map[string]any{"type": typ, "challenge": challenge, "origin": k.origin, "crossOrigin": false})
	return cd
}

// create answers a registration's options.
func (k *softKey) create(t *testing.T, opts []byte) []byte {
	var o struct {
		PublicKey struct {
			Challenge string `json:"challenge"`
			User      struct {
				ID string `json:"id"`
			} `json:"user"`
		} `json:"publicKey"`
	}
	if err := json.Unmarshal(opts, &o); err != nil {
		t.Fatalf("creation options %s: %v", opts, err)
	}
	k.handle, _ = base64.RawURLEncoding.DecodeString(o.PublicKey.User.ID)
	att, _ := cbor.Marshal(map[string]any{"fmt": "none", "attStmt": map[string]any{}, "authData": k.authData(true)})
	body, _ := json.Marshal(map[string]any{"id": b64(k.id), "rawId": b64(k.id), "type": "public-key",
		"response": map[string]any{"attestationObject": b64(att), "clientDataJSON": b64(k.clientData("webauthn.create", o.PublicKey.Challenge)), "transports": []string{"internal"}}})
	return body
}

// get answers a sign-in's options.
func (k *softKey) get(t *testing.T, opts []byte) []byte {
	var o struct {
		PublicKey struct {
			Challenge string `json:"challenge"`
		} `json:"publicKey"`
	}
	if err := json.Unmarshal(opts, &o); err != nil {
		t.Fatalf("request options %s: %v", opts, err)
	}
	k.count++
	ad := k.authData(false)
	cd := k.clientData("webauthn.get", o.PublicKey.Challenge)
	// The signature is over authenticatorData ‖ SHA-256(clientDataJSON).
	h := sha256.Sum256(cd)
	digest := sha256.Sum256(append(append([]byte{}, ad...), h[:]...))
	sig, err := ecdsa.SignASN1(rand.Reader, k.key, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(map[string]any{"id": b64(k.id), "rawId": b64(k.id), "type": "public-key",
		"response": map[string]any{"authenticatorData": b64(ad), "clientDataJSON": b64(cd), "signature": b64(sig), "userHandle": b64(k.handle)}})
	return body
}

// pageClient is a browser without a browser: cookies, the CSRF token of
// the last page, and JSON posts like the page's script makes.
type pageClient struct {
	t    *testing.T
	base string
	c    *http.Client
	csrf string
}

func newPageClient(t *testing.T, base string) *pageClient {
	jar, _ := cookiejar.New(nil)
	return &pageClient{t: t, base: base, c: &http.Client{Jar: jar, Timeout: 10 * time.Second}}
}

var csrfRE = `name="csrf" value="`

func (p *pageClient) get(path string) (int, string) {
	p.t.Helper()
	resp, err := p.c.Get(p.base + path)
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if i := strings.Index(string(b), csrfRE); i >= 0 {
		p.csrf = string(b)[i+len(csrfRE):][:43]
	}
	return resp.StatusCode, string(b)
}

func (p *pageClient) post(path string, body []byte) (int, []byte) {
	p.t.Helper()
	req, _ := http.NewRequest("POST", p.base+path, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-CSRF-Token", p.csrf)
	resp, err := p.c.Do(req)
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// passkeyStore is what the test needs of a store; both stores are one.
type passkeyStore interface {
	mfa.Secrets
	mfa.PasskeyStore
	Enroll(user string, opts mfa.EnrollOptions, force bool) (*otp.Key, error)
}

// fileStore is a FileStore in a temporary directory, its secrets and
// passkeys sealed.
func fileStore(t *testing.T) passkeyStore {
	keys, err := mfa.NewKeyText()
	if err != nil {
		t.Fatal(err)
	}
	kr, err := mfa.ParseKeyring(keys)
	if err != nil {
		t.Fatal(err)
	}
	fs, err := mfa.OpenFileStoreKeyed(filepath.Join(t.TempDir(), "totp.json"), kr)
	if err != nil {
		t.Fatal(err)
	}
	return fs
}

// pgStore is a PostgreSQL store (mfa/pgstore) on a throwaway cluster.
func pgStore(t *testing.T) passkeyStore {
	c := pgtest.Start(t, pgcluster.Options{})
	s, err := pgstore.Open(c.DSN(pgcluster.Superuser, "postgres", "postgres"), pgstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if _, _, err := s.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	return s
}

// passkeyPage is a page over fs with alice and bob enrolled for TOTP,
// served at http://localhost (the RP ID must be a domain).
func passkeyPage(t *testing.T, fs passkeyStore) (*Server, *httptest.Server) {
	t.Helper()
	if _, err := fs.Enroll("alice", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	if _, err := fs.Enroll("bob", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	g := mfa.NewGuard(mfa.Options{}, fs)
	var s *Server
	var err error
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.Handler().ServeHTTP(w, r) }))
	ts.Start()
	t.Cleanup(ts.Close)
	u, _ := url.Parse(ts.URL)
	base := "http://localhost:" + u.Port()
	s, err = New(Config{Guard: g, Approvals: mfa.NewApprovals(g), URL: base, Passkeys: fs})
	if err != nil {
		t.Fatal(err)
	}
	if !s.PasskeysOn() {
		t.Fatal("passkeys are off")
	}
	return s, ts
}

// enrollLink makes an enrollment link the way `pgmfa enroll --webauthn`
// does and returns its path.
func enrollLink(t *testing.T, fs mfa.PasskeyStore, user string, ttl time.Duration) string {
	t.Helper()
	token, hash, err := mfa.NewPasskeyLinkToken()
	if err != nil {
		t.Fatal(err)
	}
	if err := fs.AddPasskeyLink(user, hash, time.Now().Add(ttl)); err != nil {
		t.Fatal(err)
	}
	return "/enroll/" + token
}

// The ceremonies end to end with a software authenticator, and what the
// page refuses: a reused or expired enrollment link, a replayed assertion,
// a forged CSRF token, another origin, a body too large, a counter that
// goes backwards.
func TestPasskeyCeremonies(t *testing.T) {
	t.Run("file", func(t *testing.T) { passkeyCeremonies(t, fileStore(t)) })
	t.Run("postgres", func(t *testing.T) { passkeyCeremonies(t, pgStore(t)) })
}

func passkeyCeremonies(t *testing.T, fs passkeyStore) {
	s, ts := passkeyPage(t, fs)
	u, _ := url.Parse(ts.URL)
	origin := "http://localhost:" + u.Port()
	key := newSoftKey(t, "localhost", origin)
	p := newPageClient(t, "http://127.0.0.1:"+u.Port())

	// Enrollment from a link, once.
	link := enrollLink(t, fs, "alice", time.Minute)
	if code, body := p.get(link); code != 200 || !strings.Contains(body, `id="passkey-register"`) || !strings.Contains(body, "alice") {
		t.Fatalf("enrollment page: %d\n%s", code, body)
	}
	code, opts := p.post(link+"/begin", []byte(`{}`))
	if code != 200 {
		t.Fatalf("begin: %d %s", code, opts)
	}
	if !strings.Contains(string(opts), `"residentKey":"required"`) || !strings.Contains(string(opts), `"userVerification":"required"`) {
		t.Fatalf("creation options do not require a passkey with user verification: %s", opts)
	}
	code, res := p.post(link+"/finish", key.create(t, opts))
	if code != 200 || !strings.Contains(string(res), "registered") {
		t.Fatalf("finish: %d %s", code, res)
	}
	pks, err := fs.UserPasskeys("alice")
	if err != nil || len(pks) != 1 || !bytes.Equal(pks[0].ID, key.id) {
		t.Fatalf("stored passkeys: %v %+v", err, pks)
	}
	if code, body := p.get(link); code != http.StatusGone || !strings.Contains(body, "not valid") {
		t.Fatalf("a used enrollment link: %d\n%s", code, body)
	}
	expired := enrollLink(t, fs, "alice", time.Millisecond)
	time.Sleep(5 * time.Millisecond)
	if code, body := p.get(expired); code != http.StatusGone {
		t.Fatalf("an expired enrollment link: %d\n%s", code, body)
	}

	// Sign-in from the start page (discoverable), and a replay of it.
	p.get("/")
	code, opts = p.post("/passkey/begin", []byte(`{"token":""}`))
	if code != 200 {
		t.Fatalf("begin sign-in: %d %s", code, opts)
	}
	assertion := key.get(t, opts)
	if code, res := p.post("/passkey/finish", assertion); code != 200 || !strings.Contains(string(res), `"redirect"`) {
		t.Fatalf("sign-in: %d %s", code, res)
	}
	pre := p.csrf // the signed-in page carries the session's token instead
	if code, body := p.get("/"); code != 200 || !strings.Contains(body, "Signed in as <code>alice</code>") {
		t.Fatalf("after sign-in: %d\n%s", code, body)
	}
	p.csrf = pre
	if code, res := p.post("/passkey/finish", assertion); code != http.StatusBadRequest || !strings.Contains(string(res), "used already") {
		t.Fatalf("a replayed assertion: %d %s", code, res)
	}
	// A replay against a fresh challenge: the signature is over the old one.
	p.post("/passkey/begin", []byte(`{"token":""}`))
	if code, res := p.post("/passkey/finish", assertion); code != http.StatusUnauthorized {
		t.Fatalf("an assertion for another challenge: %d %s", code, res)
	}

	// Sign-in from a login's link names the user's own passkeys.
	o, _ := s.Refer(mfa.Login{User: "alice", Addr: "192.0.2.7:5000", Database: "app"})
	token := o.Hint[strings.Index(o.Hint, "/l/")+3:][:43]
	q := newPageClient(t, "http://127.0.0.1:"+u.Port())
	if code, body := q.get("/l/" + token); code != 200 || !strings.Contains(body, `id="passkey-signin"`) {
		t.Fatalf("link page: %d\n%s", code, body)
	}
	code, opts = q.post("/passkey/begin", []byte(`{"token":"`+token+`"}`))
	if code != 200 || !strings.Contains(string(opts), b64(key.id)) {
		t.Fatalf("begin from a link does not name alice's passkey: %d %s", code, opts)
	}
	if code, res := q.post("/passkey/finish", key.get(t, opts)); code != 200 {
		t.Fatalf("sign-in from a link: %d %s", code, res)
	}
	if _, ok := s.openLink(token); ok {
		t.Fatal("the login's link is still open after signing in with it")
	}
	pks, _ = fs.UserPasskeys("alice")
	if pks[0].SignCount != key.count {
		t.Fatalf("stored counter %d, authenticator %d", pks[0].SignCount, key.count)
	}

	// A counter that goes backwards (a cloned authenticator) is refused.
	clone := *key
	clone.count = 0
	_, opts = p.post("/passkey/begin", []byte(`{"token":""}`))
	if code, res := p.post("/passkey/finish", clone.get(t, opts)); code != http.StatusUnauthorized || !strings.Contains(string(res), "counter") {
		t.Fatalf("a cloned authenticator: %d %s", code, res)
	}

	// bob's link cannot register a passkey for alice, nor bob sign in as her.
	bobLink := enrollLink(t, fs, "bob", time.Minute)
	q.get(bobLink)
	_, opts = q.post(bobLink+"/begin", []byte(`{}`))
	bobKey := newSoftKey(t, "localhost", origin)
	if code, res := q.post(bobLink+"/finish", bobKey.create(t, opts)); code != 200 {
		t.Fatalf("bob's enrollment: %d %s", code, res)
	}
	if pks, _ := fs.UserPasskeys("bob"); len(pks) != 1 {
		t.Fatalf("bob has %d passkeys", len(pks))
	}
	o, _ = s.Refer(mfa.Login{User: "alice", Addr: "192.0.2.7:5001"})
	token = o.Hint[strings.Index(o.Hint, "/l/")+3:][:43]
	m := newPageClient(t, "http://127.0.0.1:"+u.Port()) // not signed in
	m.get("/l/" + token)
	_, opts = m.post("/passkey/begin", []byte(`{"token":"`+token+`"}`))
	if code, res := m.post("/passkey/finish", bobKey.get(t, opts)); code != http.StatusUnauthorized {
		t.Fatalf("bob's passkey on alice's link: %d %s", code, res)
	}

	// What every ceremony request must carry.
	r := newPageClient(t, "http://127.0.0.1:"+u.Port())
	r.get("/")
	good := r.csrf
	r.csrf = strings.Repeat("A", 43)
	if code, _ := r.post("/passkey/begin", []byte(`{}`)); code != http.StatusForbidden {
		t.Fatalf("a forged CSRF token: %d", code)
	}
	r.csrf = good
	req, _ := http.NewRequest("POST", r.base+"/passkey/begin", strings.NewReader(`{}`))
	req.Header.Set("Content-Type", "text/plain")
	req.Header.Set("X-CSRF-Token", good)
	if resp, err := r.c.Do(req); err != nil || resp.StatusCode != http.StatusUnsupportedMediaType {
		t.Fatalf("a form post: %v %v", err, resp)
	}
	req, _ = http.NewRequest("POST", r.base+"/passkey/begin", strings.NewReader(`{}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-CSRF-Token", good)
	req.Header.Set("Origin", "https://evil.example")
	if resp, err := r.c.Do(req); err != nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("another origin: %v %v", err, resp)
	}
	if code, res := r.post("/passkey/finish", bytes.Repeat([]byte("x"), maxJSONBody+1)); code != http.StatusRequestEntityTooLarge {
		t.Fatalf("an oversized body: %d %s", code, res)
	}
	// And the page still serves.
	if code, _ := r.get("/"); code != 200 {
		t.Fatalf("the page after bad input: %d", code)
	}
	// Two sign-ins, and four refusals: the replay, the other challenge,
	// the clone, bob on alice's link.
	if ok, bad := s.SignIns(MethodPasskey, true), s.SignIns(MethodPasskey, false); ok != 2 || bad != 4 {
		t.Fatalf("passkey sign-ins counted: %d ok, %d refused; want 2 and 4", ok, bad)
	}
}
