package mfa

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func testKeyring(t *testing.T, n int) (*Keyring, string) {
	t.Helper()
	var lines []string
	for i := 0; i < n; i++ {
		k, err := NewKeyText()
		if err != nil {
			t.Fatal(err)
		}
		lines = append(lines, k)
	}
	text := "# pgmfa store key\n" + strings.Join(lines, "\n") + "\n"
	kr, err := ParseKeyring(text)
	if err != nil {
		t.Fatal(err)
	}
	return kr, text
}

func TestSealOpen(t *testing.T) {
	kr, _ := testKeyring(t, 1)
	sealed, err := kr.Seal("alice", secretA)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(sealed, secretA) || !Sealed(sealed) || sealedKeyID(sealed) != kr.CurrentID() {
		t.Fatalf("sealed value %q", sealed)
	}
	if got, err := kr.Open("alice", sealed); err != nil || got != secretA {
		t.Fatalf("open: %q %v", got, err)
	}
	// Bound to the user: the same value under another user does not open.
	if _, err := kr.Open("bob", sealed); !errors.Is(err, ErrTampered) {
		t.Fatalf("open as another user: %v", err)
	}
	// One flipped byte of the ciphertext.
	b := []byte(sealed)
	b[len(b)-3] ^= 'A' ^ 'B'
	if b[len(b)-3] == sealed[len(sealed)-3] {
		b[len(b)-3] = 'C'
	}
	if _, err := kr.Open("alice", string(b)); !errors.Is(err, ErrTampered) {
		t.Fatalf("open tampered: %v", err)
	}
	other, _ := testKeyring(t, 1)
	if _, err := other.Open("alice", sealed); !errors.Is(err, ErrUnknownKey) || !strings.Contains(err.Error(), kr.CurrentID()) {
		t.Fatalf("open with another key: %v", err)
	}
	var none *Keyring
	if _, err := none.Open("alice", sealed); !errors.Is(err, ErrNoKey) {
		t.Fatalf("open without a key: %v", err)
	}
	// Plaintext (a store from before encryption) passes through.
	if got, err := none.Open("alice", secretA); err != nil || got != secretA {
		t.Fatal(got, err)
	}
}

func TestParseKeyringErrors(t *testing.T) {
	for text, want := range map[string]string{
		"":                            "no key",
		"# only a comment\n":          "no key",
		"not base64!":                 "not base64",
		"c2hvcnQ=":                    "is 5 bytes",
		strings.Repeat("A", 43) + "=": "",
		"AAAA\n" + "c2hvcnQ=\n":       "line 1",
	} {
		_, err := ParseKeyring(text)
		if want == "" {
			if err != nil {
				t.Errorf("%q: %v", text, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want an error with %q", text, err, want)
		}
	}
	k, _ := NewKeyText()
	if _, err := ParseKeyring(k + "\n" + k); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("a repeated key: %v", err)
	}
}

func TestLoadKeyringRefusesOpenFile(t *testing.T) {
	_, text := testKeyring(t, 1)
	p := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeyring(p); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("0644 key file: %v", err)
	}
	os.Chmod(p, 0o600)
	if kr, err := LoadKeyring(p); err != nil || kr == nil {
		t.Fatal(kr, err)
	}
	t.Setenv(KeyEnv, text)
	if kr, err := LoadKeyring(""); err != nil || kr == nil {
		t.Fatal(kr, err)
	}
	t.Setenv(KeyEnv, "")
	if kr, err := LoadKeyring(""); err != nil || kr != nil {
		t.Fatal(kr, err)
	}
}

// The JSON file holds no secret in plaintext once a key is given; a store
// written before encryption loads, counts its plaintext secrets, and is
// sealed by Reseal.
func TestFileStoreEncryptsAtRest(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "totp.json")
	legacy, err := OpenFileStore(path)
	if err != nil {
		t.Fatal(err)
	}
	k1, err := legacy.Enroll("alice", EnrollOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(path)
	if !strings.Contains(string(raw), k1.Secret()) {
		t.Fatal("the store without a key should be plaintext (the old format)")
	}

	kr, _ := testKeyring(t, 1)
	s, err := OpenFileStoreKeyed(path, kr)
	if err != nil {
		t.Fatal(err)
	}
	if s.Plaintext() != 1 {
		t.Fatalf("plaintext count %d, want 1", s.Plaintext())
	}
	k2, err := s.Enroll("bob", EnrollOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := s.Reseal(); err != nil || n != 2 {
		t.Fatal(n, err)
	}
	raw, _ = os.ReadFile(path)
	for _, sec := range []string{k1.Secret(), k2.Secret()} {
		if strings.Contains(string(raw), sec) || strings.Contains(strings.ToUpper(string(raw)), sec[:16]) {
			t.Fatalf("plaintext secret in the file:\n%s", raw)
		}
	}
	var doc storeFile
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	if sealedKeyID(doc.Users["alice"].Secret) != kr.CurrentID() {
		t.Fatalf("alice's record: %+v", doc.Users["alice"])
	}
	// Codes still verify.
	g := NewGuard(Options{}, s)
	if o := g.Verify("alice", "10.0.0.1:1", code(t, g, "alice", time.Now())); !o.OK {
		t.Fatal(o)
	}

	// Without the key the store is refused, naming the remedy.
	if _, err := OpenFileStore(path); !errors.Is(err, ErrNoKey) || !strings.Contains(err.Error(), "--store-key-file") {
		t.Fatalf("open without the key: %v", err)
	}
	// With another key: unknown key id, and nothing is written.
	other, _ := testKeyring(t, 1)
	if _, err := OpenFileStoreKeyed(path, other); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("open with another key: %v", err)
	}
	// A tampered record is refused on load, and the file is not rewritten.
	doc.Users["bob"] = storedUser{Secret: doc.Users["alice"].Secret, Digits: 6, Period: 30, Algorithm: "SHA1"}
	tampered, _ := json.Marshal(doc)
	if err := os.WriteFile(path, tampered, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(); !errors.Is(err, ErrTampered) || !strings.Contains(err.Error(), `"bob"`) {
		t.Fatalf("reload of a tampered store: %v", err)
	}
	if _, err := s.Enroll("carol", EnrollOptions{}, false); !errors.Is(err, ErrTampered) {
		t.Fatalf("enroll into a tampered store: %v", err)
	}
	after, _ := os.ReadFile(path)
	if string(after) != string(tampered) {
		t.Fatal("a failed write changed the file")
	}
}

// FuzzOpen: no stored value makes Open panic, a sealed value that opens is
// bound to its user, and plaintext passes through unchanged.
func FuzzOpen(f *testing.F) {
	kr, err := ParseKeyring(strings.Repeat("A", 43) + "=")
	if err != nil {
		f.Fatal(err)
	}
	good, _ := kr.Seal("alice", secretA)
	f.Add(good)
	f.Add(secretA)
	f.Add("aes256gcm:")
	f.Add("aes256gcm:" + kr.CurrentID() + ":")
	f.Add("aes256gcm:zzzzzzzzzzzzzzzz:AAAA")
	f.Fuzz(func(t *testing.T, v string) {
		got, err := kr.Open("alice", v)
		if err != nil {
			return
		}
		if Sealed(v) {
			// Whatever opens for alice is bound to her: never for bob.
			if _, err := kr.Open("bob", v); err == nil {
				t.Fatalf("%q opened for two users", v)
			}
		}
		if !Sealed(v) && got != v {
			t.Fatalf("plaintext %q came back as %q", v, got)
		}
	})
}

// FuzzParseKeyring: no key file makes the parser panic, and every keyring
// it returns seals and opens.
func FuzzParseKeyring(f *testing.F) {
	k, _ := NewKeyText()
	f.Add(k)
	f.Add("# c\n\n" + k + "\n" + strings.Repeat("A", 43) + "=")
	f.Add("AAAA")
	f.Fuzz(func(t *testing.T, text string) {
		kr, err := ParseKeyring(text)
		if err != nil {
			return
		}
		s, err := kr.Seal("u", "S")
		if err != nil {
			t.Fatal(err)
		}
		if got, err := kr.Open("u", s); err != nil || got != "S" {
			t.Fatal(got, err)
		}
	})
}

// sealedKeyID is the key id a sealed value names ("" if malformed).
func sealedKeyID(v string) string {
	id, _, err := splitSealed(v)
	if err != nil {
		return ""
	}
	return id
}
