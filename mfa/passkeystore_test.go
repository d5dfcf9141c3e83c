package mfa

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func tokenHash(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}

func testPasskey(n int) Passkey {
	return Passkey{
		ID:        []byte(fmt.Sprintf("credential-%d", n)),
		Data:      []byte(fmt.Sprintf(`{"publicKey":"PUBKEY-%d-do-not-leak"}`, n)),
		SignCount: uint32(n),
	}
}

// twoStores opens two FileStores on one file, as two processes would, with
// alice and bob enrolled.
func twoStores(t *testing.T, keys *Keyring) (*FileStore, *FileStore, string) {
	t.Helper()
	path := storePath(t)
	a, err := OpenFileStoreKeyed(path, keys)
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"alice", "bob"} {
		if _, err := a.Enroll(u, EnrollOptions{}, false); err != nil {
			t.Fatal(err)
		}
	}
	b, err := OpenFileStoreKeyed(path, keys)
	if err != nil {
		t.Fatal(err)
	}
	return a, b, path
}

func oneKey(t *testing.T) *Keyring {
	t.Helper()
	kr, _ := testKeyring(t, 1)
	return kr
}

func TestFileStorePasskeyLinkSeenByAnotherStore(t *testing.T) {
	a, b, _ := twoStores(t, oneKey(t))
	now := time.Now()
	if err := a.AddPasskeyLink("alice", tokenHash("t1"), now.Add(15*time.Minute)); err != nil {
		t.Fatal(err)
	}
	// b loaded the file before the link was written and is not reloaded.
	user, ok, err := b.PasskeyLink(tokenHash("t1"), now)
	if err != nil || !ok || user != "alice" {
		t.Fatalf("link from another store: %q %v %v", user, ok, err)
	}
	if _, ok, _ := b.PasskeyLink(tokenHash("other"), now); ok {
		t.Fatal("unknown token accepted")
	}
	if _, ok, _ := b.PasskeyLink(tokenHash("t1"), now.Add(15*time.Minute)); ok {
		t.Fatal("link valid at its expiry")
	}
	if err := a.AddPasskeyLink("carol", tokenHash("t2"), now.Add(time.Minute)); !errors.Is(err, ErrNotEnrolled) {
		t.Fatalf("link for a user without TOTP: %v", err)
	}
	if err := a.AddPasskeyLink("alice", []byte("short"), now.Add(time.Minute)); err == nil {
		t.Fatal("a token hash that is not a SHA-256 was accepted")
	}

	p := testPasskey(1)
	user, err = b.EnrollPasskey(tokenHash("t1"), now, p)
	if err != nil || user != "alice" {
		t.Fatalf("enroll: %q %v", user, err)
	}
	// a sees the passkey without Reload; the link is used up.
	got, err := a.UserPasskeys("alice")
	if err != nil || len(got) != 1 || !bytes.Equal(got[0].ID, p.ID) || !bytes.Equal(got[0].Data, p.Data) || got[0].SignCount != 1 || got[0].Created.IsZero() {
		t.Fatalf("alice's passkeys: %+v %v", got, err)
	}
	if u, q, ok, err := a.PasskeyByID(p.ID); err != nil || !ok || u != "alice" || !bytes.Equal(q.Data, p.Data) {
		t.Fatalf("by id: %q %+v %v %v", u, q, ok, err)
	}
	if _, _, ok, _ := a.PasskeyByID([]byte("nope")); ok {
		t.Fatal("unknown id found")
	}
	if _, ok, _ := a.PasskeyLink(tokenHash("t1"), now); ok {
		t.Fatal("a used link is still valid")
	}
	if _, err := a.EnrollPasskey(tokenHash("t1"), now, testPasskey(2)); !errors.Is(err, ErrLinkInvalid) {
		t.Fatalf("second use of a link: %v", err)
	}
	if bobs, _ := a.UserPasskeys("bob"); len(bobs) != 0 {
		t.Fatalf("bob has %d passkeys", len(bobs))
	}
}

func TestFileStoreEnrollPasskeyRefusals(t *testing.T) {
	a, b, _ := twoStores(t, nil)
	now := time.Now()
	a.AddPasskeyLink("alice", tokenHash("expired"), now.Add(-time.Second))
	if _, err := b.EnrollPasskey(tokenHash("expired"), now, testPasskey(1)); !errors.Is(err, ErrLinkInvalid) {
		t.Fatalf("expired link: %v", err)
	}
	if _, err := b.EnrollPasskey(tokenHash("never made"), now, testPasskey(1)); !errors.Is(err, ErrLinkInvalid) {
		t.Fatalf("unknown link: %v", err)
	}

	// A credential id stored already: refused, and the link stays usable.
	a.AddPasskeyLink("bob", tokenHash("b1"), now.Add(time.Hour))
	a.AddPasskeyLink("alice", tokenHash("a1"), now.Add(time.Hour))
	if _, err := b.EnrollPasskey(tokenHash("b1"), now, testPasskey(1)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.EnrollPasskey(tokenHash("a1"), now, testPasskey(1)); !errors.Is(err, ErrPasskeyExists) {
		t.Fatalf("duplicate id: %v", err)
	}
	if u, ok, _ := a.PasskeyLink(tokenHash("a1"), now); !ok || u != "alice" {
		t.Fatal("a refused enrollment used the link")
	}

	for _, bad := range []Passkey{{Data: []byte("x")}, {ID: make([]byte, MaxPasskeyIDLen+1), Data: []byte("x")}, {ID: []byte("x")}} {
		if _, err := b.EnrollPasskey(tokenHash("a1"), now, bad); err == nil {
			t.Fatalf("bad passkey (id %d bytes, data %d) accepted", len(bad.ID), len(bad.Data))
		}
	}

	// At most MaxPasskeysPerUser, and the refusal leaves the link unused.
	for i := 0; i < MaxPasskeysPerUser; i++ {
		tok := fmt.Sprintf("many-%d", i)
		a.AddPasskeyLink("alice", tokenHash(tok), now.Add(time.Hour))
		if _, err := b.EnrollPasskey(tokenHash(tok), now, testPasskey(100+i)); err != nil {
			t.Fatal(i, err)
		}
	}
	if _, err := b.EnrollPasskey(tokenHash("a1"), now, testPasskey(99)); err == nil || !strings.Contains(err.Error(), "most") {
		t.Fatalf("passkey %d: %v", MaxPasskeysPerUser+1, err)
	}
	if _, ok, _ := a.PasskeyLink(tokenHash("a1"), now); !ok {
		t.Fatal("the refusal used the link")
	}
	// Oldest first.
	ps, _ := a.UserPasskeys("alice")
	for i := 1; i < len(ps); i++ {
		if ps[i].Created.Before(ps[i-1].Created) {
			t.Fatal("not oldest first")
		}
	}
}

// One link, used by many goroutines on two stores at once: one passkey.
func TestFileStoreEnrollPasskeyOnceConcurrently(t *testing.T) {
	a, b, _ := twoStores(t, oneKey(t))
	now := time.Now()
	if err := a.AddPasskeyLink("alice", tokenHash("once"), now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	var won, lost atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.EnrollPasskey(tokenHash("once"), now, testPasskey(i))
			switch {
			case err == nil:
				won.Add(1)
			case errors.Is(err, ErrLinkInvalid):
				lost.Add(1)
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	ps, _ := b.UserPasskeys("alice")
	if won.Load() != 1 || lost.Load() != 19 || len(ps) != 1 {
		t.Fatalf("%d won, %d lost, %d passkeys; want 1, 19, 1", won.Load(), lost.Load(), len(ps))
	}
}

func TestFileStorePasskeySignCountCAS(t *testing.T) {
	a, b, _ := twoStores(t, nil)
	now := time.Now()
	a.AddPasskeyLink("alice", tokenHash("t"), now.Add(time.Minute))
	p := testPasskey(5)
	if _, err := a.EnrollPasskey(tokenHash("t"), now, p); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.SetSignCount(p.ID, 4, 6); ok || err != nil {
		t.Fatalf("CAS from a stale count: %v %v", ok, err)
	}
	if ok, err := b.SetSignCount(p.ID, 5, 6); !ok || err != nil {
		t.Fatalf("CAS: %v %v", ok, err)
	}
	if ok, _ := a.SetSignCount(p.ID, 5, 7); ok {
		t.Fatal("second CAS from the same old count succeeded")
	}
	if ok, _ := a.SetSignCount([]byte("gone"), 0, 1); ok {
		t.Fatal("CAS on an unknown passkey succeeded")
	}
	// Concurrently from one old count: exactly one moves it.
	var moved atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if ok, err := s.SetSignCount(p.ID, 6, uint32(100+i)); err != nil {
				t.Error(err)
			} else if ok {
				moved.Add(1)
			}
		}()
	}
	wg.Wait()
	_, q, _, _ := a.PasskeyByID(p.ID)
	if moved.Load() != 1 || q.SignCount < 100 {
		t.Fatalf("%d moved the count to %d; want exactly one", moved.Load(), q.SignCount)
	}
}

func TestFileStorePasskeySealedAtRest(t *testing.T) {
	kr := oneKey(t)
	a, _, path := twoStores(t, kr)
	now := time.Now()
	a.AddPasskeyLink("alice", tokenHash("secret-token"), now.Add(time.Minute))
	p := testPasskey(7)
	if _, err := a.EnrollPasskey(tokenHash("secret-token"), now, p); err != nil {
		t.Fatal(err)
	}
	a.AddPasskeyLink("alice", tokenHash("secret-token-2"), now.Add(time.Minute))
	raw, _ := os.ReadFile(path)
	for _, leak := range [][]byte{p.Data, []byte("PUBKEY-7"), []byte(base64.StdEncoding.EncodeToString(p.Data)), []byte("secret-token")} {
		if bytes.Contains(raw, leak) {
			t.Fatalf("the file holds %q:\n%s", leak, raw)
		}
	}
	if a.Plaintext() != 0 {
		t.Fatalf("Plaintext %d with a key", a.Plaintext())
	}

	// Alice's sealed record moved onto bob does not open.
	var doc map[string]json.RawMessage
	json.Unmarshal(raw, &doc)
	var pks []storedPasskey
	json.Unmarshal(doc["passkeys"], &pks)
	if len(pks) != 1 || !Sealed(pks[0].Data) {
		t.Fatalf("stored passkeys: %+v", pks)
	}
	if _, err := kr.Open(PasskeyAD("alice"), pks[0].Data); err != nil {
		t.Fatal(err)
	}
	pks[0].User = "bob"
	doc["passkeys"], _ = json.Marshal(pks)
	moved, _ := json.Marshal(doc)
	os.WriteFile(path, moved, 0o600)
	if _, err := a.UserPasskeys("bob"); !errors.Is(err, ErrTampered) {
		t.Fatalf("alice's passkey moved to bob: %v", err)
	}

	// Without a key: no sealed store opens; a plaintext store counts its
	// passkeys as plaintext.
	if _, err := OpenFileStore(path); !errors.Is(err, ErrNoKey) {
		t.Fatalf("sealed store without a key: %v", err)
	}
	plain, _, _ := twoStores(t, nil)
	plain.AddPasskeyLink("alice", tokenHash("p"), now.Add(time.Minute))
	plain.EnrollPasskey(tokenHash("p"), now, p)
	if plain.Plaintext() != 3 {
		t.Fatalf("Plaintext %d, want 2 secrets + 1 passkey", plain.Plaintext())
	}
}

func TestFileStoreRemoveAndResealCoverPasskeys(t *testing.T) {
	old := oneKey(t)
	a, b, path := twoStores(t, old)
	now := time.Now()
	for i, u := range []string{"alice", "alice", "bob"} {
		tok := fmt.Sprint("t", i)
		a.AddPasskeyLink(u, tokenHash(tok), now.Add(time.Minute))
		if _, err := a.EnrollPasskey(tokenHash(tok), now, testPasskey(i)); err != nil {
			t.Fatal(err)
		}
	}
	a.AddPasskeyLink("alice", tokenHash("open"), now.Add(time.Minute))
	a.AddPasskeyLink("bob", tokenHash("bob-open"), now.Add(time.Minute))

	// Rotate: a keyring with a new current key and the old one.
	newText, _ := NewKeyText()
	rotated, err := ParseKeyring(newText)
	if err != nil {
		t.Fatal(err)
	}
	rotated.keys = append(rotated.keys, old.keys...)
	a.SetKeys(rotated)
	if n, err := a.Reseal(); err != nil || n != 2 {
		t.Fatalf("reseal: %d %v", n, err)
	}
	raw, _ := os.ReadFile(path)
	if strings.Contains(string(raw), old.CurrentID()) {
		t.Fatalf("a record is still sealed with the old key:\n%s", raw)
	}
	// The new key alone opens everything, passkeys included.
	onlyNew, _ := ParseKeyring(newText)
	fresh, err := OpenFileStoreKeyed(path, onlyNew)
	if err != nil {
		t.Fatal(err)
	}
	if ps, err := fresh.UserPasskeys("alice"); err != nil || len(ps) != 2 {
		t.Fatalf("after reseal: %d %v", len(ps), err)
	}

	b.SetKeys(rotated)
	if n, err := b.RemovePasskeys("alice"); err != nil || n != 2 {
		t.Fatalf("remove alice's passkeys: %d %v", n, err)
	}
	if _, ok, _ := a.PasskeyLink(tokenHash("open"), now); ok {
		t.Fatal("alice's open link survived RemovePasskeys")
	}
	if n, err := b.RemovePasskeys("alice"); err != nil || n != 0 {
		t.Fatalf("again: %d %v", n, err)
	}
	if _, ok := a.Secret("alice"); !ok {
		t.Fatal("RemovePasskeys removed the TOTP enrollment")
	}
	if err := b.Remove("bob"); err != nil {
		t.Fatal(err)
	}
	if ps, _ := a.UserPasskeys("bob"); len(ps) != 0 {
		t.Fatal("bob's passkeys survived his removal")
	}
	if _, ok, _ := a.PasskeyLink(tokenHash("bob-open"), now); ok {
		t.Fatal("bob's link survived his removal")
	}
	// Re-enrolling bob does not bring anything back.
	b.Enroll("bob", EnrollOptions{}, false)
	if ps, _ := a.UserPasskeys("bob"); len(ps) != 0 {
		t.Fatal("bob's passkeys came back")
	}
}

func TestFileStorePasskeyLinksExpiredArePruned(t *testing.T) {
	a, _, path := twoStores(t, nil)
	now := time.Now()
	a.AddPasskeyLink("alice", tokenHash("gone"), now.Add(-time.Minute))
	a.AddPasskeyLink("alice", tokenHash("kept"), now.Add(time.Hour))
	raw, _ := os.ReadFile(path)
	var doc storeFile
	json.Unmarshal(raw, &doc)
	if len(doc.PasskeyLinks) != 1 || doc.PasskeyLinks[0].Expires.Before(now) {
		t.Fatalf("links on disk: %+v", doc.PasskeyLinks)
	}
}

// A file written before passkeys loads; bad passkey records are refused
// with a message that says what is wrong.
func TestFileStorePasskeyRecordsChecked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "totp.json")
	oldFile := `{"version":1,"users":{"alice":{"secret":"` + secretA + `","digits":6,"period":30,"algorithm":"SHA1"}}}`
	os.WriteFile(path, []byte(oldFile), 0o600)
	s, err := OpenFileStore(path)
	if err != nil {
		t.Fatal("a file without passkeys:", err)
	}
	if ps, err := s.UserPasskeys("alice"); err != nil || len(ps) != 0 {
		t.Fatal(ps, err)
	}
	data := base64.StdEncoding.EncodeToString([]byte("{}"))
	long := base64.RawURLEncoding.EncodeToString(make([]byte, MaxPasskeyIDLen+1))
	hash := strings.Repeat("ab", 32)
	for _, c := range []struct{ extra, want string }{
		{`"passkeys":[{"user":"alice","id":"a+b/","data":"` + data + `","sign_count":0}]`, "base64url"},
		{`"passkeys":[{"user":"alice","id":"` + long + `","data":"` + data + `","sign_count":0}]`, "1 to 1023"},
		{`"passkeys":[{"user":"alice","id":"","data":"` + data + `","sign_count":0}]`, "1 to 1023"},
		{`"passkeys":[{"user":"mallory","id":"AAAA","data":"` + data + `","sign_count":0}]`, `user "mallory" is not enrolled`},
		{`"passkeys":[{"user":"alice","id":"AAAA","data":"!!","sign_count":0}]`, "neither encrypted nor base64"},
		{`"passkeys":[{"user":"alice","id":"AAAA","data":"","sign_count":0}]`, "no credential data"},
		{`"passkeys":[{"user":"alice","id":"AAAA","data":"` + data + `"},{"user":"alice","id":"AAAA","data":"` + data + `"}]`, "stored twice"},
		{`"passkeys":[{"user":"alice","id":"AAAA","data":"aes256gcm:0011223344556677:AAAA"}]`, "encrypted"},
		{`"passkey_links":[{"token_sha256":"xyz","user":"alice","expires":"2030-01-01T00:00:00Z"}]`, "64 lower-case hex"},
		{`"passkey_links":[{"token_sha256":"` + strings.ToUpper(hash) + `","user":"alice","expires":"2030-01-01T00:00:00Z"}]`, "64 lower-case hex"},
		{`"passkey_links":[{"token_sha256":"` + hash + `","user":"bob","expires":"2030-01-01T00:00:00Z"}]`, `user "bob" is not enrolled`},
	} {
		doc := strings.TrimSuffix(oldFile, "}") + "," + c.extra + "}"
		os.WriteFile(path, []byte(doc), 0o600)
		_, err := OpenFileStore(path)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error containing %q", c.extra, err, c.want)
		}
	}
}

// FuzzReadStore: no store file makes the reader panic, and whatever it
// accepts is written back and reads the same (users, passkeys, links).
func FuzzReadStore(f *testing.F) {
	kr, err := ParseKeyring(strings.Repeat("A", 43) + "=")
	if err != nil {
		f.Fatal(err)
	}
	user := `"alice":{"secret":"` + secretA + `","digits":6,"period":30,"algorithm":"SHA1"}`
	sealed, _ := kr.Seal(PasskeyAD("alice"), `{"k":1}`)
	data := base64.StdEncoding.EncodeToString([]byte(`{"k":1}`))
	hash := strings.Repeat("0f", 32)
	f.Add(`{"version":1,"users":{` + user + `}}`)
	f.Add(`{"version":1,"users":{` + user + `},"passkeys":[{"user":"alice","id":"AAAA","data":"` + data + `","sign_count":3,"created":"2026-01-01T00:00:00Z"}]}`)
	f.Add(`{"version":1,"users":{` + user + `},"passkeys":[{"user":"alice","id":"AQID","data":"` + sealed + `","sign_count":4294967295}],"passkey_links":[{"token_sha256":"` + hash + `","user":"alice","expires":"2030-01-01T00:00:00Z"}]}`)
	f.Add(`{"version":1,"users":{` + user + `},"passkeys":[{"user":"alice","id":"-_8","data":"` + data + `"}],"passkey_links":[]}`)
	f.Add(`{"version":1,"users":{},"passkeys":[{"user":"","id":"AAAA","data":"` + data + `"}]}`)
	f.Fuzz(func(t *testing.T, text string) {
		dir := t.TempDir()
		path := filepath.Join(dir, "s.json")
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := readStoreAll(path, kr)
		if err != nil {
			return
		}
		for _, keys := range []*Keyring{kr, nil} {
			again := filepath.Join(dir, "again.json")
			if err := writeStore(again, c, keys); err != nil {
				t.Fatal(err)
			}
			c2, err := readStoreAll(again, kr)
			if err != nil {
				t.Fatalf("written back, not read: %v", err)
			}
			if len(c2.users) != len(c.users) || len(c2.passkeys.byID) != len(c.passkeys.byID) || len(c2.passkeys.links) != len(c.passkeys.links) {
				t.Fatalf("round trip changed the counts")
			}
			for id, h := range c.passkeys.byID {
				h2 := c2.passkeys.byID[id]
				if h2.user != h.user || !bytes.Equal(h2.Data, h.Data) || h2.SignCount != h.SignCount || !h2.Created.Equal(h.Created) {
					t.Fatalf("passkey %x changed: %+v -> %+v", id, h, h2)
				}
			}
		}
	})
}
