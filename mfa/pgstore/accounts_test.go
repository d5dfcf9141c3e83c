package pgstore_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/mfa/pgstore"
)

const pgTestVerifier = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$T2ZmbGluZUJydXRlRm9yY2VIZXJlU3RvcmVkS2V5IT0=:U2VydmVyS2V5U2VydmVyS2V5U2VydmVyS2V5U2VydmU="

// Accounts in a PostgreSQL store: the same operations and errors as the
// file store, nothing in the clear in the tables, re-sealed by a key
// rotation, and readable (only) by the proxy's role.
func TestAccountsInPostgres(t *testing.T) {
	old, oldText := keyring(t, 1)
	s, opts := open(t, old)
	if err := s.AddAccount("alice", mfa.AccountRecord{Verifier: pgTestVerifier, Role: "app_rw", DBPassword: "db-pass-XYZ"}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddAccount("alice", mfa.AccountRecord{Verifier: pgTestVerifier, Role: "x"}); !errors.Is(err, mfa.ErrAccountExists) {
		t.Fatalf("duplicate: %v", err)
	}
	if err := s.SetAccountVerifier("ghost", pgTestVerifier); !errors.Is(err, mfa.ErrNoAccount) {
		t.Fatalf("passwd unknown: %v", err)
	}
	if err := s.RemoveAccount("ghost"); !errors.Is(err, mfa.ErrNoAccount) {
		t.Fatalf("remove unknown: %v", err)
	}
	if err := s.AddAccount("bob", mfa.AccountRecord{Verifier: "md5" + strings.Repeat("a", 32), Role: "app_ro"}); err != nil {
		t.Fatal(err)
	}
	secret, err := s.AccountsSecret()
	if err != nil || len(secret) != 32 {
		t.Fatalf("secret %x %v", secret, err)
	}
	dump, err := startCluster(t).Psql(`SELECT row_to_json(a)::text FROM ` + opts.Schema + `.accounts a UNION ALL SELECT row_to_json(x)::text FROM ` + opts.Schema + `.account_secret x`)
	if err != nil {
		t.Fatal(err)
	}
	for _, plain := range []string{"db-pass-XYZ", "T2ZmbGluZUJydXRl", "aaaaaaaa", hex.EncodeToString(secret)} {
		if strings.Contains(dump, plain) {
			t.Fatalf("%q in the clear in the tables:\n%s", plain, dump)
		}
	}
	// Rotation re-seals the accounts: the new key alone opens them.
	newKey, _ := mfa.NewKeyText()
	both, _ := mfa.ParseKeyring(newKey + "\n" + oldText)
	opts.Keys = both
	if _, err := another(t, opts).Reseal(); err != nil {
		t.Fatal(err)
	}
	onlyNew, _ := mfa.ParseKeyring(newKey)
	opts.Keys = onlyNew
	r := another(t, opts)
	a, ok, err := r.GetAccount("alice")
	if err != nil || !ok || a.DBPassword != "db-pass-XYZ" || a.Role != "app_rw" || a.Verifier != pgTestVerifier {
		t.Fatalf("after rotation: %+v %v %v", a, ok, err)
	}
	if sec, err := r.AccountsSecret(); err != nil || !bytes.Equal(sec, secret) {
		t.Fatalf("secret after rotation: %v", err)
	}
	if err := r.RemoveAccount("bob"); err != nil {
		t.Fatal(err)
	}
	if names, err := r.ListAccounts(); err != nil || strings.Join(names, ",") != "alice" {
		t.Fatalf("list %v %v", names, err)
	}
	// The proxy's role reads accounts and cannot write them.
	if err := s.GrantRole(context.Background(), "proxy"); err != nil {
		t.Fatal(err)
	}
	p, err := pgstore.Open(startCluster(t).DSN("proxy", "proxy", "postgres"), opts)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, ok, err := p.GetAccount("alice"); !ok || err != nil {
		t.Fatalf("the proxy's role cannot read accounts: %v", err)
	}
	if err := p.AddAccount("mallory", mfa.AccountRecord{Verifier: pgTestVerifier, Role: "postgres"}); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("the proxy's role added an account: %v", err)
	}
}
