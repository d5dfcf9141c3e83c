package mfa

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const testVerifier = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$T2ZmbGluZUJydXRlRm9yY2VIZXJlU3RvcmVkS2V5IT0=:U2VydmVyS2V5U2VydmVyS2V5U2VydmVyS2V5U2VydmU="

// Accounts live beside the enrollments: writing one keeps the other, and
// a second store sharing the file sees both.
func TestAccountsInFileStore(t *testing.T) {
	kr, _ := testKeyring(t, 1)
	path := filepath.Join(t.TempDir(), "store.json")
	s, err := OpenFileStoreKeyed(path, kr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Enroll("alice", EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	if err := s.AddAccount("alice", AccountRecord{Verifier: testVerifier, Role: "app_rw", DBPassword: "db-pass-XYZ"}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddAccount("alice", AccountRecord{Verifier: testVerifier, Role: "x"}); !errors.Is(err, ErrAccountExists) {
		t.Fatalf("duplicate add: %v", err)
	}
	if err := s.SetAccountVerifier("ghost", testVerifier); !errors.Is(err, ErrNoAccount) {
		t.Fatalf("passwd unknown: %v", err)
	}
	if err := s.RemoveAccount("ghost"); !errors.Is(err, ErrNoAccount) {
		t.Fatalf("remove unknown: %v", err)
	}
	if _, err := s.Enroll("bob", EnrollOptions{}, false); err != nil { // a TOTP write keeps the accounts
		t.Fatal(err)
	}
	secret := s.AccountSecret()
	if len(secret) != 32 {
		t.Fatalf("account secret %x", secret)
	}
	again, err := OpenFileStoreKeyed(path, kr)
	if err != nil {
		t.Fatal(err)
	}
	a, ok := again.LookupAccount("alice")
	if !ok || a.Role != "app_rw" || a.DBPassword != "db-pass-XYZ" || a.Verifier != testVerifier || a.Created.IsZero() {
		t.Fatalf("reloaded %+v %v", a, ok)
	}
	if string(again.AccountSecret()) != string(secret) {
		t.Fatal("account secret changed on reload")
	}
	if got := again.Users(); len(got) != 2 {
		t.Fatalf("enrollments lost: %v", got)
	}
	raw, _ := os.ReadFile(path)
	for _, plain := range []string{"db-pass-XYZ", "T2ZmbGluZUJydXRl", hex.EncodeToString(secret)} {
		if strings.Contains(string(raw), plain) {
			t.Fatalf("store file holds %q in the clear:\n%s", plain, raw)
		}
	}
	// A sealed verifier moved onto another account does not open.
	var doc map[string]any
	json.Unmarshal(raw, &doc)
	accts := doc["accounts"].(map[string]any)
	accts["mallory"] = accts["alice"]
	raw, _ = json.Marshal(doc)
	os.WriteFile(path, raw, 0o600)
	if _, err := OpenFileStoreKeyed(path, kr); !errors.Is(err, ErrTampered) {
		t.Fatalf("moved account: %v", err)
	}
}

// Without a key, a verifier may be stored (it is what PostgreSQL stores)
// but a database password is refused.
func TestAccountCredentialNeedsKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.json")
	s, err := OpenFileStore(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.AddAccount("a", AccountRecord{Verifier: testVerifier, Role: "r", DBPassword: "pw"}); !errors.Is(err, ErrCredentialNeedsKey) {
		t.Fatal(err)
	}
	if err := s.AddAccount("a", AccountRecord{Verifier: testVerifier, Role: "r"}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetAccountVerifier("a", "md5"+strings.Repeat("0", 32)); err != nil {
		t.Fatal(err)
	}
	if err := s.RemoveAccount("a"); err != nil || len(s.AccountNames()) != 0 {
		t.Fatal(err, s.AccountNames())
	}
}
