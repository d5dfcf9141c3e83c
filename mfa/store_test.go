package mfa

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pquerna/otp/totp"
)

func storePath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "sub", "totp.json")
}

func TestFileStoreEnrollWritesPrivateFile(t *testing.T) {
	path := storePath(t)
	s, err := OpenFileStore(path)
	if err != nil {
		t.Fatal("missing file:", err)
	}
	if len(s.Users()) != 0 {
		t.Fatal("missing file is not empty")
	}
	key, err := s.Enroll("alice", EnrollOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("store mode %04o", fi.Mode().Perm())
	}
	di, _ := os.Stat(filepath.Dir(path))
	if di.Mode().Perm() != 0o700 {
		t.Fatalf("created directory mode %04o", di.Mode().Perm())
	}
	// No temporary files left behind.
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries", len(entries))
	}
	// Defaults: SHA1, 6 digits, 30 s, 20-byte secret; an app computing
	// codes from the URI agrees with the store.
	if key.Algorithm().String() != "SHA1" || key.Digits().Length() != 6 || key.Period() != 30 || key.Issuer() != "pgmfa" || key.AccountName() != "alice" {
		t.Fatalf("key %s", key.URL())
	}
	if b, _ := decodeSecret(key.Secret()); len(b) != 20 {
		t.Fatalf("secret of %d bytes", len(b))
	}
	now := time.Now()
	want, _ := totp.GenerateCode(key.Secret(), now)
	if got, err := s.Code("alice", now); err != nil || got != want {
		t.Fatalf("Code %q %v, want %q", got, err, want)
	}
	// A fresh open sees the same.
	s2, err := OpenFileStore(path)
	if err != nil {
		t.Fatal(err)
	}
	if sec, ok := s2.Secret("alice"); !ok || sec != key.Secret() {
		t.Fatal("reopened store lost the secret")
	}
}

func TestFileStoreRefusesOpenPermissions(t *testing.T) {
	path := storePath(t)
	s, _ := OpenFileStore(path)
	if _, err := s.Enroll("alice", EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []os.FileMode{0o640, 0o604, 0o620, 0o666} {
		os.Chmod(path, mode)
		_, err := OpenFileStore(path)
		if err == nil || !strings.Contains(err.Error(), "chmod 600 "+path) {
			t.Fatalf("mode %04o: %v", mode, err)
		}
		// Reload refuses it too, and keeps the old content.
		if err := s.Reload(); err == nil {
			t.Fatalf("mode %04o: Reload accepted", mode)
		}
		if _, ok := s.Secret("alice"); !ok {
			t.Fatal("failed Reload dropped the old content")
		}
	}
	os.Chmod(path, 0o400)
	if _, err := OpenFileStore(path); err != nil {
		t.Fatalf("0400: %v", err)
	}
}

func TestFileStoreEnrollForceAndRemove(t *testing.T) {
	path := storePath(t)
	s, _ := OpenFileStore(path)
	k1, err := s.Enroll("alice", EnrollOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Enroll("alice", EnrollOptions{}, false)
	if !errors.Is(err, ErrAlreadyEnrolled) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("second enroll: %v", err)
	}
	if sec, _ := s.Secret("alice"); sec != k1.Secret() {
		t.Fatal("refused enroll changed the secret")
	}
	k2, err := s.Enroll("alice", EnrollOptions{}, true)
	if err != nil {
		t.Fatal(err)
	}
	if k2.Secret() == k1.Secret() {
		t.Fatal("--force did not rotate")
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode after rotation %04o", fi.Mode().Perm())
	}
	if err := s.Remove("alice"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove("alice"); !errors.Is(err, ErrNotEnrolled) {
		t.Fatalf("second remove: %v", err)
	}
	if len(s.Users()) != 0 {
		t.Fatal(s.Users())
	}
	for _, bad := range []string{"", "a\nb", strings.Repeat("x", 64)} {
		if _, err := s.Enroll(bad, EnrollOptions{}, false); err == nil {
			t.Fatalf("enrolled %q", bad)
		}
	}
	if _, err := s.Enroll("bob", EnrollOptions{Digits: 7}, false); err == nil {
		t.Fatal("enrolled with 7 digits")
	}
}

// TestFileStoreKeepsParameters: users keep the parameters they were enrolled
// with when the server's defaults differ.
func TestFileStoreKeepsParameters(t *testing.T) {
	path := storePath(t)
	s, _ := OpenFileStore(path)
	rnd := bytes.NewReader(bytes.Repeat([]byte{7}, 64))
	key, err := s.Enroll("carol", EnrollOptions{Digits: 8, Period: time.Minute, Algorithm: "sha512", Issuer: "db1", Rand: rnd}, false)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := key.Secret(), b32(string(bytes.Repeat([]byte{7}, 64))); got != want {
		t.Fatalf("secret from the injected randomness: %s, want %s", got, want)
	}
	if !strings.Contains(key.URL(), "algorithm=SHA512") || !strings.Contains(key.URL(), "digits=8") || !strings.Contains(key.URL(), "period=60") || !strings.HasPrefix(key.URL(), "otpauth://totp/db1:carol?") {
		t.Fatalf("URI %s", key.URL())
	}
	s2, _ := OpenFileStore(path)
	acct, ok := s2.Account("carol")
	if !ok || acct.Digits != 8 || acct.Period != time.Minute || acct.Algorithm != "SHA512" {
		t.Fatalf("%+v", acct)
	}
	clk := newClock(t0)
	g := NewGuard(Options{Digits: 6, Period: 30 * time.Second, Algorithm: "SHA1", Now: clk.Now}, s2)
	c, err := s2.Code("carol", clk.Now())
	if err != nil || len(c) != 8 {
		t.Fatalf("code %q %v", c, err)
	}
	if o := g.Verify("carol", "192.0.2.1:1", c); !o.OK {
		t.Fatalf("%+v", o)
	}
}

func TestFileStoreReload(t *testing.T) {
	path := storePath(t)
	server, _ := OpenFileStore(path)
	admin, _ := OpenFileStore(path)
	if _, err := admin.Enroll("alice", EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	if _, ok := server.Secret("alice"); ok {
		t.Fatal("visible before reload")
	}
	if err := server.Reload(); err != nil {
		t.Fatal(err)
	}
	if _, ok := server.Secret("alice"); !ok {
		t.Fatal("not visible after reload")
	}
	// A broken file: Reload fails and keeps the old content.
	os.WriteFile(path, []byte("{not json"), 0o600)
	if err := server.Reload(); err == nil {
		t.Fatal("reload of garbage succeeded")
	}
	if _, ok := server.Secret("alice"); !ok {
		t.Fatal("failed reload dropped the content")
	}
	// Entries that could never verify are refused at load.
	for _, doc := range []string{
		`{"version":1,"users":{"x":{"secret":"!!","digits":6,"period":30,"algorithm":"SHA1"}}}`,
		`{"version":1,"users":{"x":{"secret":"JBSWY3DP","digits":7,"period":30,"algorithm":"SHA1"}}}`,
		`{"version":1,"users":{"x":{"secret":"JBSWY3DP","digits":6,"period":0,"algorithm":"SHA1"}}}`,
		`{"version":1,"users":{"x":{"secret":"JBSWY3DP","digits":6,"period":30,"algorithm":"MD5"}}}`,
		`{"version":2,"users":{}}`,
	} {
		os.WriteFile(path, []byte(doc), 0o600)
		if _, err := OpenFileStore(path); err == nil {
			t.Fatalf("accepted %s", doc)
		}
	}
}

// TestFileStoreConcurrentEnrolls: two store handles (two `pgmfa enroll`
// runs) writing at once lose nobody.
func TestFileStoreConcurrentEnrolls(t *testing.T) {
	path := storePath(t)
	a, _ := OpenFileStore(path)
	b, _ := OpenFileStore(path)
	var wg sync.WaitGroup
	for i := 0; i < 10; i++ {
		for j, s := range []*FileStore{a, b} {
			wg.Add(1)
			go func(s *FileStore, name string) {
				defer wg.Done()
				if _, err := s.Enroll(name, EnrollOptions{}, false); err != nil {
					t.Error(err)
				}
			}(s, fmt.Sprintf("user%d-%d", i, j))
		}
	}
	wg.Wait()
	c, err := OpenFileStore(path)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(c.Users()); n != 20 {
		t.Fatalf("%d users after 20 enrolls: %v", n, c.Users())
	}
}

// TestUsedStepSurvivesRestart: a code accepted by one proxy process is
// refused by the next one reading the same store (RFC 6238 §5.2 across a
// restart).
func TestUsedStepSurvivesRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "totp.json")
	store, err := OpenFileStore(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.Enroll("alice", EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_800_000_000, 0)
	code, err := store.Code("alice", now)
	if err != nil {
		t.Fatal(err)
	}
	clock := func() time.Time { return now }
	if o := NewGuard(Options{Now: clock}, store).Verify("alice", "10.0.0.1:5", code); !o.OK {
		t.Fatalf("first use refused: %+v", o)
	}
	// A new process: a fresh store handle and guard.
	store2, err := OpenFileStore(path)
	if err != nil {
		t.Fatal(err)
	}
	if o := NewGuard(Options{Now: clock}, store2).Verify("alice", "10.0.0.1:5", code); o.OK || o.Reason != ReasonReplayed {
		t.Fatalf("the same code after a restart: %+v, want replayed", o)
	}
	// The next step's code is fine.
	next, _ := store2.Code("alice", now.Add(30*time.Second))
	if o := NewGuard(Options{Now: func() time.Time { return now.Add(30 * time.Second) }}, store2).Verify("alice", "10.0.0.1:5", next); !o.OK {
		t.Fatalf("next code refused: %+v", o)
	}
}

// TestClaimStep: the compare-and-set on the file.
func TestClaimStep(t *testing.T) {
	path := filepath.Join(t.TempDir(), "totp.json")
	store, _ := OpenFileStore(path)
	if _, err := store.Enroll("bob", EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	secret, _ := store.Secret("bob")
	other, _ := OpenFileStore(path) // another process's handle
	for _, c := range []struct {
		s     *FileStore
		step  int64
		claim bool
	}{
		{store, 1_800_000_030, true},
		{other, 1_800_000_030, false}, // the same step, through another handle
		{other, 1_800_000_000, false}, // an older one
		{other, 1_800_000_060, true},
		{store, 1_800_000_060, false},
	} {
		got, err := c.s.ClaimStep("bob", c.step, secret)
		if err != nil || got != c.claim {
			t.Fatalf("claim %d: %v %v, want %v", c.step, got, err, c.claim)
		}
	}
	again, _ := OpenFileStore(path)
	if a, _ := again.Account("bob"); a.LastStep != 1_800_000_060 {
		t.Fatalf("LastStep = %d, want 1800000060", a.LastStep)
	}
	// A failed claim adopts the file: store now knows the newest step.
	if a, _ := store.Account("bob"); a.LastStep != 1_800_000_060 {
		t.Fatalf("the store did not adopt the file's step: %d", a.LastStep)
	}
	if _, err := store.ClaimStep("bob", 1_800_000_090, "AAAAAAAA"); !errors.Is(err, ErrSecretChanged) {
		t.Fatalf("another secret: %v", err)
	}
	if _, err := store.ClaimStep("carol", 1_800_000_090, secret); !errors.Is(err, ErrNotEnrolled) {
		t.Fatalf("unknown user: %v", err)
	}
}

// TestSingleUseAcrossGuards: two Guards, each over its own handle of one
// store file (two proxy processes: an HA pair, a TLS and a plaintext
// listener), receive 50 concurrent logins with one code: exactly one is
// admitted. Each Guard alone kept single use; the store did not.
func TestSingleUseAcrossGuards(t *testing.T) {
	path := filepath.Join(t.TempDir(), "totp.json")
	s0, _ := OpenFileStore(path)
	if _, err := s0.Enroll("alice", EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { return now }
	c, _ := s0.Code("alice", now)
	var guards []*Guard
	for i := 0; i < 2; i++ {
		s, err := OpenFileStore(path)
		if err != nil {
			t.Fatal(err)
		}
		guards = append(guards, NewGuard(Options{Now: clock}, s))
	}
	var admitted, replayed atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func(g *Guard, i int) {
			defer wg.Done()
			<-start
			switch o := g.Verify("alice", fmt.Sprintf("192.0.2.%d:5000", i), c); {
			case o.OK:
				admitted.Add(1)
			case o.Reason == ReasonReplayed:
				replayed.Add(1)
			default:
				t.Errorf("login %d: %+v", i, o)
			}
		}(guards[i%2], i)
	}
	close(start)
	wg.Wait()
	if admitted.Load() != 1 || replayed.Load() != 49 {
		t.Fatalf("%d admitted, %d replayed; want exactly 1 admitted", admitted.Load(), replayed.Load())
	}
}

// TestSingleUseAcrossProcesses is TestSingleUseAcrossGuards with two real
// processes (this test binary re-executed) sharing the file.
func TestSingleUseAcrossProcesses(t *testing.T) {
	if path := os.Getenv("PGMFA_TEST_CLAIM_STORE"); path != "" {
		claimHelper(path)
		return
	}
	path := filepath.Join(t.TempDir(), "totp.json")
	s0, _ := OpenFileStore(path)
	if _, err := s0.Enroll("alice", EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	var outs [2]bytes.Buffer
	var cmds [2]*exec.Cmd
	for i := range cmds {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSingleUseAcrossProcesses$", "-test.count=1")
		cmd.Env = append(os.Environ(), "PGMFA_TEST_CLAIM_STORE="+path)
		cmd.Stdout, cmd.Stderr = &outs[i], &outs[i]
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds[i] = cmd
	}
	admitted := 0
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("helper %d: %v\n%s", i, err, outs[i].String())
		}
		var n int
		if _, err := fmt.Sscanf(outs[i].String()[strings.Index(outs[i].String(), "admitted="):], "admitted=%d", &n); err != nil {
			t.Fatalf("helper %d: %s", i, outs[i].String())
		}
		admitted += n
	}
	if admitted != 1 {
		t.Fatalf("two processes admitted %d logins with one code, want 1", admitted)
	}
}

// claimHelper is one process of TestSingleUseAcrossProcesses: 25
// concurrent logins with the code of a fixed instant.
func claimHelper(path string) {
	store, err := OpenFileStore(path)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	now := time.Unix(1_800_000_000, 0)
	c, _ := store.Code("alice", now)
	g := NewGuard(Options{Now: func() time.Time { return now }}, store)
	var admitted atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 25; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if o := g.Verify("alice", "192.0.2.1:1", c); o.OK {
				admitted.Add(1)
			} else if o.Reason != ReasonReplayed {
				fmt.Println("error:", o.Reason)
			}
		}()
	}
	wg.Wait()
	fmt.Printf("admitted=%d\n", admitted.Load())
}

// failingClaimer is a store that cannot record anything.
type failingClaimer struct{ accounts }

func (failingClaimer) ClaimStep(string, int64, string) (bool, error) {
	return false, errors.New("disk full")
}

// TestStoreFailureFailsClosed: a code the store could not claim is refused
// (it could be replayed elsewhere), and the operator is told.
func TestStoreFailureFailsClosed(t *testing.T) {
	var told error
	fc := failingClaimer{accounts{"alice": {Secret: secretA}}}
	g := NewGuard(Options{Now: func() time.Time { return t0 }, OnStoreError: func(_ string, err error) { told = err }}, fc)
	o := g.Verify("alice", "192.0.2.1:1", code(t, g, "alice", t0))
	if o.OK || o.Reason != ReasonStore || o.Hint == "" || told == nil {
		t.Fatalf("%+v, told %v", o, told)
	}
}

// TestClaimSeesReEnrollment: another process re-enrolls alice (a lost
// phone); this process, still holding the old secret, refuses the old
// secret's codes at the claim and accepts the new secret's.
func TestClaimSeesReEnrollment(t *testing.T) {
	path := filepath.Join(t.TempDir(), "totp.json")
	mine, _ := OpenFileStore(path)
	if _, err := mine.Enroll("alice", EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_800_000_000, 0)
	g := NewGuard(Options{Now: func() time.Time { return now }}, mine)
	old, _ := mine.Code("alice", now)
	other, _ := OpenFileStore(path)
	if _, err := other.Enroll("alice", EnrollOptions{}, true); err != nil {
		t.Fatal(err)
	}
	if o := g.Verify("alice", "192.0.2.1:1", old); o.OK || o.Reason != ReasonBadCode {
		t.Fatalf("the old secret's code after re-enrollment: %+v", o)
	}
	fresh, _ := other.Code("alice", now)
	if o := g.Verify("alice", "192.0.2.1:1", fresh); !o.OK {
		t.Fatalf("the new secret's code: %+v", o)
	}
}
