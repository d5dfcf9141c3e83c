package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
)

func runStoreT(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := storeCmd(args, &out, &errb)
	return code, out.String(), errb.String()
}

// secretsIn returns the secrets of the otpauth URIs enroll printed.
var secretRE = regexp.MustCompile(`secret=([A-Z2-7]+)`)

func enrolledSecret(t *testing.T, out string) string {
	t.Helper()
	m := secretRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no secret in:\n%s", out)
	}
	return m[1]
}

// A file store written before encryption: it loads, says how to encrypt
// it, and new-key + rotate-key encrypt it; the file then holds no secret,
// and wrong keys change nothing.
func TestStoreCommandsOnAFileStore(t *testing.T) {
	t.Setenv("PGMFA_STORE_KEY", "")
	dir := t.TempDir()
	store := filepath.Join(dir, "totp.json")
	keyFile := filepath.Join(dir, "store.key")

	code, out, stderr := runEnrollT(t, "--store", store, "--qr=false", "alice")
	if code != 0 {
		t.Fatal(stderr)
	}
	secret := enrolledSecret(t, out)
	if !strings.Contains(stderr, "unencrypted") || !strings.Contains(stderr, "pgmfa store new-key") {
		t.Fatalf("enroll into a plaintext store does not say how to encrypt it:\n%s", stderr)
	}

	if code, out, stderr := runStoreT(t, "new-key", "--store-key-file", keyFile); code != 0 || !strings.Contains(out, "wrote key") {
		t.Fatalf("new-key: %d %s %s", code, out, stderr)
	}
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}
	if code, out, stderr := runStoreT(t, "rotate-key", "--store", store, "--store-key-file", keyFile); code != 0 || !strings.Contains(out, "re-encrypted 1 secret") {
		t.Fatalf("rotate-key: %d %s %s", code, out, stderr)
	}
	raw, _ := os.ReadFile(store)
	if strings.Contains(string(raw), secret) || strings.Contains(string(raw), secret[:16]) {
		t.Fatalf("the secret is in the file after rotate-key:\n%s", raw)
	}

	// Now the key is needed, and the error says so.
	if _, err := openStore(store, ""); err == nil || !strings.Contains(err.Error(), "--store-key-file") {
		t.Fatalf("open without the key: %v", err)
	}
	s, err := openStore(store, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := s.Code("alice", time.Unix(1_800_000_000, 0))
	want, _ := mfa.CodeFor(mfa.Account{Secret: secret}, time.Unix(1_800_000_000, 0))
	if got != want {
		t.Fatalf("code after encryption %q, want %q", got, want)
	}

	// A second new-key keeps the first: rotation re-seals under the new one.
	if code, out, _ := runStoreT(t, "new-key", "--store-key-file", keyFile); code != 0 || !strings.Contains(out, "2 key(s)") {
		t.Fatalf("second new-key: %s", out)
	}
	if code, _, stderr := runStoreT(t, "rotate-key", "--store", store, "--store-key-file", keyFile); code != 0 {
		t.Fatal(stderr)
	}

	// Another key file: refused, naming the key id, and the store is not
	// rewritten.
	before, _ := os.ReadFile(store)
	other := filepath.Join(dir, "other.key")
	runStoreT(t, "new-key", "--store-key-file", other)
	code, _, stderr = runStoreT(t, "rotate-key", "--store", store, "--store-key-file", other)
	if code == 0 || !strings.Contains(stderr, "not in the key file") {
		t.Fatalf("rotate-key with a foreign key: %d %s", code, stderr)
	}
	code, _, stderr = runEnrollT(t, "--store", store, "--store-key-file", other, "--qr=false", "bob")
	if code == 0 || !strings.Contains(stderr, "not in the key file") {
		t.Fatalf("enroll with a foreign key: %d %s", code, stderr)
	}
	if after, _ := os.ReadFile(store); !bytes.Equal(before, after) {
		t.Fatal("a refused command changed the store")
	}
	// A key file open to others is refused.
	os.Chmod(other, 0o644)
	if code, _, stderr := runStoreT(t, "rotate-key", "--store", store, "--store-key-file", other); code == 0 || !strings.Contains(stderr, "chmod 600") {
		t.Fatalf("a 0644 key file: %d %s", code, stderr)
	}
}

// init is idempotent; migrate copies a file store (used codes stay used)
// in one transaction and refuses to overwrite; bad connection strings are
// named.
func TestStoreCommandsOnPostgres(t *testing.T) {
	t.Setenv("PGMFA_STORE_KEY", "")
	pg := pgtest.Start(t, pgcluster.Options{})
	dsn := pg.DSN(pgcluster.Superuser, "postgres", "postgres")
	dir := t.TempDir()
	file := filepath.Join(dir, "totp.json")
	keyFile := filepath.Join(dir, "store.key")
	runStoreT(t, "new-key", "--store-key-file", keyFile)

	if code, out, stderr := runStoreT(t, "init", "--store", dsn); code != 0 || !strings.Contains(out, "upgraded from version 0") {
		t.Fatalf("init: %d %s %s", code, out, stderr)
	}
	if code, out, stderr := runStoreT(t, "init", "--store", dsn); code != 0 || !strings.Contains(out, "up to date") {
		t.Fatalf("second init: %d %s %s", code, out, stderr)
	}
	if code, _, stderr := runStoreT(t, "init", "--store", file); code != 2 || !strings.Contains(stderr, "is a file") {
		t.Fatalf("init of a file: %d %s", code, stderr)
	}

	// A file store with alice, whose current step was used.
	fs, err := mfa.OpenFileStore(file)
	if err != nil {
		t.Fatal(err)
	}
	key, err := fs.Enroll("alice", mfa.EnrollOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	g := mfa.NewGuard(mfa.Options{}, fs)
	now := time.Now()
	c, _ := fs.Code("alice", now)
	if o := g.Verify("alice", "10.0.0.1:1", c); !o.OK {
		t.Fatal(o)
	}

	// and an account of --auth accounts.
	verifier := proto.NewSCRAMVerifier("alice-pw", []byte("0123456789abcdef"), 4096)
	if err := fs.AddAccount("alice", mfa.AccountRecord{Verifier: verifier, Role: "app"}); err != nil {
		t.Fatal(err)
	}

	// and a passkey, registered through a link.
	fs.AddPasskeyLink("alice", mfa.PasskeyLinkHash("tok"), now.Add(time.Hour))
	migrated := mfa.Passkey{ID: []byte("migrated"), Data: []byte(`{"pk":"PUBKEY-MIGRATED"}`), SignCount: 7}
	if _, err := fs.EnrollPasskey(mfa.PasskeyLinkHash("tok"), now, migrated); err != nil {
		t.Fatal(err)
	}

	code, out, stderr := runStoreT(t, "migrate", "--from", file, "--to", dsn, "--store-key-file", keyFile)
	if code != 0 || !strings.Contains(out, "copied 1 enrollment") || !strings.Contains(out, "copied 1 account") || !strings.Contains(out, "copied 1 passkey") {
		t.Fatalf("migrate: %d %s %s", code, out, stderr)
	}
	s, err := openStore(dsn, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if a, ok, err := s.(accountStore).GetAccount("alice"); err != nil || !ok || a.Verifier != verifier || a.Role != "app" {
		t.Fatalf("the migrated account: %+v %v %v", a, ok, err)
	}
	if u, p, ok, err := s.PasskeyByID(migrated.ID); err != nil || !ok || u != "alice" || string(p.Data) != string(migrated.Data) || p.SignCount != 7 {
		t.Fatalf("the migrated passkey: %q %+v %v %v", u, p, ok, err)
	}
	if dump, _ := pg.Psql(`SELECT data FROM pgmfa.passkeys`); strings.Contains(dump, "PUBKEY") || !strings.Contains(dump, "aes256gcm:") {
		t.Fatalf("the migrated passkey is not encrypted: %s", dump)
	}
	pgGuard := mfa.NewGuard(mfa.Options{}, s)
	if o := pgGuard.Verify("alice", "10.0.0.1:1", c); o.Reason != mfa.ReasonReplayed {
		t.Fatalf("a code used before the migration, after it: %+v", o)
	}
	dump, err := pg.Psql(`SELECT row_to_json(u)::text FROM pgmfa.users u`)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(dump, key.Secret()) || !strings.Contains(dump, "aes256gcm:") {
		t.Fatalf("the migrated secret is not encrypted:\n%s", dump)
	}
	// Again: alice exists, nothing is written.
	code, _, stderr = runStoreT(t, "migrate", "--from", file, "--to", dsn, "--store-key-file", keyFile)
	if code == 0 || !strings.Contains(stderr, "already in the store") {
		t.Fatalf("second migrate: %d %s", code, stderr)
	}
	if after, _ := pg.Psql(`SELECT row_to_json(u)::text FROM pgmfa.users u`); after != dump {
		t.Fatal("a refused migrate changed the store")
	}

	// Enroll and code against PostgreSQL.
	code, out, stderr = runEnrollT(t, "--store", dsn, "--store-key-file", keyFile, "--qr=false", "bob")
	if code != 0 || !strings.Contains(out, "at the next login") {
		t.Fatalf("enroll into PostgreSQL: %d %s %s", code, out, stderr)
	}
	bob := enrolledSecret(t, out)
	got, err := s.Code("bob", now)
	want, _ := mfa.CodeFor(mfa.Account{Secret: bob}, now)
	if err != nil || got != want {
		t.Fatalf("bob's code from PostgreSQL %q %v, want %q", got, err, want)
	}

	// A passkey enrollment link in PostgreSQL, and the removals.
	token := checkPasskeyLink(t, dsn, s, time.Hour, "--store-key-file", keyFile, "--expires", "1h", "--web-url", "https://db.example.com:8443")
	if _, err := s.EnrollPasskey(mfa.PasskeyLinkHash(token), time.Now(), mfa.Passkey{ID: []byte("id1"), Data: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	if code, out, stderr := runEnrollT(t, "--store", dsn, "--store-key-file", keyFile, "--remove", "--webauthn", "alice"); code != 0 || !strings.Contains(out, "Removed 2 passkey(s)") {
		t.Fatalf("--remove --webauthn in PostgreSQL: %d %s %s", code, out, stderr)
	}
	if code, _, stderr := runEnrollT(t, "--store", dsn, "--store-key-file", keyFile, "--webauthn", "--web-url", "https://db", "carol"); code != 1 || !strings.Contains(stderr, "for TOTP first") {
		t.Fatalf("link for a user not enrolled, in PostgreSQL: %d %s", code, stderr)
	}
	token = checkPasskeyLink(t, dsn, s, defaultLinkExpiry, "--store-key-file", keyFile, "--web-url", "https://db.example.com:8443")
	s.EnrollPasskey(mfa.PasskeyLinkHash(token), time.Now(), mfa.Passkey{ID: []byte("id2"), Data: []byte("{}")})
	if code, out, stderr := runEnrollT(t, "--store", dsn, "--store-key-file", keyFile, "--remove", "alice"); code != 0 || !strings.Contains(out, "with its 1 passkey(s)") {
		t.Fatalf("--remove in PostgreSQL: %d %s %s", code, out, stderr)
	}
	if _, _, ok, err := s.PasskeyByID([]byte("id2")); ok || err != nil {
		t.Fatal("--remove left the passkey:", err)
	}

	// Malformed connection strings are named as such.
	for _, bad := range []string{"postgres://u@h:notaport/db", "host=h port=notaport"} {
		code, _, stderr := runEnrollT(t, "--store", bad, "--qr=false", "carol")
		if code == 0 || !strings.Contains(stderr, "not a valid PostgreSQL connection string") {
			t.Fatalf("enroll --store %q: %d %s", bad, code, stderr)
		}
	}
}
