package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
	for _, f := range []string{"-store", "-issuer", "-digits", "-period", "-algorithm", "-force", "-qr", "-print-secret", "-remove", "usage: pgmfa enroll"} {
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
