package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
)

func runEnrollT(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := enroll(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestEnrollWritesStoreAndPrintsQR(t *testing.T) {
	store := filepath.Join(t.TempDir(), "lib", "totp.json")
	code, out, stderr := runEnrollT(t, "--store", store, "alice")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	fi, err := os.Stat(store)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("store: %v %v", fi.Mode(), err)
	}
	s, err := mfa.OpenFileStore(store)
	if err != nil {
		t.Fatal(err)
	}
	secret, ok := s.Secret("alice")
	if !ok {
		t.Fatal("alice not in the store")
	}
	if !strings.Contains(out, "otpauth://totp/pgmfa:alice?") || !strings.Contains(out, "secret="+secret) {
		t.Fatalf("no URI in:\n%s", out)
	}
	if !strings.Contains(out, "█") || !strings.Contains(out, "▀") {
		t.Fatalf("no QR code in:\n%s", out)
	}
	if strings.Contains(out, "to type in by hand") {
		t.Fatal("bare secret printed without --print-secret")
	}

	// Again: refused, with the way out.
	code, _, stderr = runEnrollT(t, "--store", store, "alice")
	if code != 1 || !strings.Contains(stderr, "--force") {
		t.Fatalf("second enroll: exit %d, %s", code, stderr)
	}
	// --force after the user, options, no QR, bare secret.
	code, out, stderr = runEnrollT(t, "--store", store, "alice", "--force", "--qr=false", "--print-secret",
		"--digits", "8", "--period", "60s", "--algorithm", "sha256", "--issuer", "db1")
	if code != 0 {
		t.Fatalf("--force: exit %d, %s", code, stderr)
	}
	s.Reload()
	acct, _ := s.Account("alice")
	if acct.Secret == secret || acct.Digits != 8 || acct.Algorithm != "SHA256" || acct.Period.Seconds() != 60 {
		t.Fatalf("rotation: %+v", acct)
	}
	if strings.Contains(out, "█") || !strings.Contains(out, "Rotated") || !strings.Contains(out, "by hand): "+acct.Secret) || !strings.Contains(out, "otpauth://totp/db1:alice?") {
		t.Fatalf("rotation output:\n%s", out)
	}

	// --remove.
	if code, _, stderr := runEnrollT(t, "--store", store, "--remove", "alice"); code != 0 {
		t.Fatalf("--remove: %d %s", code, stderr)
	}
	s.Reload()
	if len(s.Users()) != 0 {
		t.Fatal("still enrolled after --remove")
	}
}

func TestEnrollRefusesOpenStore(t *testing.T) {
	store := filepath.Join(t.TempDir(), "totp.json")
	if code, _, _ := runEnrollT(t, "--store", store, "alice"); code != 0 {
		t.Fatal("enroll")
	}
	os.Chmod(store, 0o644)
	code, _, stderr := runEnrollT(t, "--store", store, "bob")
	if code != 1 || !strings.Contains(stderr, "chmod 600") {
		t.Fatalf("exit %d: %s", code, stderr)
	}
}

func TestEnrollUsage(t *testing.T) {
	code, _, stderr := runEnrollT(t, "--help")
	if code != 0 {
		t.Fatalf("--help exit %d", code)
	}
	for _, f := range []string{"-store", "-issuer", "-digits", "-period", "-algorithm", "-force", "-qr", "-print-secret", "-remove", "-webauthn", "-web-url", "-expires", "usage: pgmfa enroll"} {
		if !strings.Contains(stderr, f) {
			t.Errorf("--help does not mention %s", f)
		}
	}
	if code, _, _ := runEnrollT(t); code != 2 {
		t.Fatal("no user: want exit 2")
	}
	store := filepath.Join(t.TempDir(), "totp.json")
	if code, _, stderr := runEnrollT(t, "--store", store, "--digits", "7", "alice"); code != 1 || !strings.Contains(stderr, "6 or 8") {
		t.Fatalf("--digits 7: %d %s", code, stderr)
	}
	if code, _, _ := runEnrollT(t, "--store", store, "alice", "bob"); code != 2 {
		t.Fatal("two users: want exit 2")
	}
}

func TestDefaults(t *testing.T) {
	t.Setenv("PGMFA_STORE", "")
	t.Setenv("PGMFA_ADMIN", "")
	if defaultStorePath() != "/var/lib/pgmfa/totp.json" || defaultAdminAddr() != "/run/pgmfa/admin.sock" {
		t.Fatal(defaultStorePath(), defaultAdminAddr())
	}
	t.Setenv("PGMFA_STORE", "/x/s.json")
	t.Setenv("PGMFA_ADMIN", "127.0.0.1:7000")
	if defaultStorePath() != "/x/s.json" || defaultAdminAddr() != "127.0.0.1:7000" {
		t.Fatal(defaultStorePath(), defaultAdminAddr())
	}
}

// linkRE finds the link enroll --webauthn prints.
var linkRE = regexp.MustCompile(`(https?://\S+)/enroll/([A-Za-z0-9_-]+)`)

// checkPasskeyLink runs enroll --webauthn for alice on store and checks
// that the printed token's hash is a link for alice in the store, valid
// for expires and not longer.
func checkPasskeyLink(t *testing.T, store string, s mfa.PasskeyStore, expires time.Duration, args ...string) string {
	t.Helper()
	before := time.Now()
	code, out, stderr := runEnrollT(t, append([]string{"--store", store, "--webauthn", "alice"}, args...)...)
	if code != 0 {
		t.Fatalf("enroll --webauthn: exit %d: %s", code, stderr)
	}
	after := time.Now()
	m := linkRE.FindStringSubmatch(out)
	if m == nil || m[1] != "https://db.example.com:8443" {
		t.Fatalf("no link to the page in:\n%s", out)
	}
	until := "until " + before.Add(expires).UTC().Format("2006-01-02 15:04")
	if !strings.Contains(out, until) {
		until = "until " + after.Add(expires).UTC().Format("2006-01-02 15:04")
	}
	for _, want := range []string{"once", "pgmfa serve --web", until, "alice"} {
		if !strings.Contains(out, want) {
			t.Errorf("the output does not say %q:\n%s", want, out)
		}
	}
	token := m[2]
	if raw, err := base64.RawURLEncoding.DecodeString(token); err != nil || len(raw) != 32 {
		t.Fatalf("token %q is not 32 random bytes in base64url", token)
	}
	h := sha256.Sum256([]byte(token))
	if u, ok, err := s.PasskeyLink(h[:], time.Now()); err != nil || !ok || u != "alice" {
		t.Fatalf("the printed link is not in the store: %q %v %v", u, ok, err)
	}
	if _, ok, _ := s.PasskeyLink(h[:], after.Add(expires)); ok {
		t.Fatal("the link is valid after --expires")
	}
	if _, ok, _ := s.PasskeyLink(h[:], before.Add(expires-time.Minute)); !ok && expires > time.Minute {
		t.Fatal("the link is not valid for --expires")
	}
	return token
}

func TestEnrollWebAuthnLinkFileStore(t *testing.T) {
	t.Setenv("PGMFA_WEB_URL", "https://db.example.com:8443/")
	t.Setenv("PGMFA_STORE_KEY", "")
	store := filepath.Join(t.TempDir(), "totp.json")
	s, err := mfa.OpenFileStore(store)
	if err != nil {
		t.Fatal(err)
	}
	// Not enrolled for TOTP: refused, with the way to do it.
	code, _, stderr := runEnrollT(t, "--store", store, "--webauthn", "alice")
	if code != 1 || !strings.Contains(stderr, "enroll alice for TOTP first: pgmfa enroll alice") {
		t.Fatalf("link for a user not enrolled: %d %s", code, stderr)
	}
	if code, _, stderr := runEnrollT(t, "--store", store, "--qr=false", "alice"); code != 0 {
		t.Fatal(stderr)
	}
	token := checkPasskeyLink(t, store, s, defaultLinkExpiry)
	checkPasskeyLink(t, store, s, 2*time.Hour, "--expires", "2h", "--web-url", "https://db.example.com:8443")
	if raw, _ := os.ReadFile(store); strings.Contains(string(raw), token) {
		t.Fatal("the token itself is in the store")
	}

	// The link registers a passkey (as the page will), then --remove
	// --webauthn removes only the passkeys, and --remove everything.
	if _, err := s.EnrollPasskey(mfa.PasskeyLinkHash(token), time.Now(), mfa.Passkey{ID: []byte("id1"), Data: []byte("{}")}); err != nil {
		t.Fatal(err)
	}
	code, out, stderr := runEnrollT(t, "--store", store, "--remove", "--webauthn", "alice")
	if code != 0 || !strings.Contains(out, "Removed 1 passkey(s)") {
		t.Fatalf("--remove --webauthn: %d %s %s", code, out, stderr)
	}
	if ps, _ := s.UserPasskeys("alice"); len(ps) != 0 {
		t.Fatal("passkeys left")
	}
	if _, ok := s.Secret("alice"); !ok {
		t.Fatal("--remove --webauthn removed the TOTP enrollment")
	}
	token = checkPasskeyLink(t, store, s, defaultLinkExpiry)
	s.EnrollPasskey(mfa.PasskeyLinkHash(token), time.Now(), mfa.Passkey{ID: []byte("id2"), Data: []byte("{}")})
	code, out, _ = runEnrollT(t, "--store", store, "--remove", "alice")
	if code != 0 || !strings.Contains(out, "with its 1 passkey(s)") {
		t.Fatalf("--remove: %d %s", code, out)
	}
	if _, _, ok, _ := s.PasskeyByID([]byte("id2")); ok {
		t.Fatal("--remove left the passkey")
	}
}

func TestEnrollWebAuthnRefusals(t *testing.T) {
	t.Setenv("PGMFA_WEB_URL", "")
	store := filepath.Join(t.TempDir(), "totp.json")
	if code, _, stderr := runEnrollT(t, "--store", store, "--qr=false", "alice"); code != 0 {
		t.Fatal(stderr)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--webauthn"}, "needs --web-url"},
		{[]string{"--webauthn", "--web-url", "ftp://db/"}, "http(s)://"},
		{[]string{"--webauthn", "--web-url", "db.example.com"}, "http(s)://"},
		{[]string{"--webauthn", "--web-url", "https://db/?x=1"}, "without query"},
		{[]string{"--webauthn", "--web-url", "https://db", "--expires", "0s"}, "at most 24h"},
		{[]string{"--webauthn", "--web-url", "https://db", "--expires", "-1m"}, "at most 24h"},
		{[]string{"--webauthn", "--web-url", "https://db", "--expires", "25h"}, "at most 24h"},
		{[]string{"--webauthn", "--web-url", "https://db", "--force"}, "--force is for enrolling a TOTP secret"},
		{[]string{"--expires", "1h"}, "--expires is for making a link"},
		{[]string{"--remove", "--webauthn", "--web-url", "https://db"}, "--web-url is for making a link"},
	} {
		code, _, stderr := runEnrollT(t, append([]string{"--store", store, "alice"}, c.args...)...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d, %s; want 2 and %q", c.args, code, stderr, c.want)
		}
	}
	s, _ := mfa.OpenFileStore(store)
	if raw, _ := os.ReadFile(store); strings.Contains(string(raw), "passkey_links") {
		t.Fatalf("a refused command wrote a link:\n%s", raw)
	}
	if ps, _ := s.UserPasskeys("alice"); len(ps) != 0 {
		t.Fatal(ps)
	}
}
