package main

import (
	"bytes"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/loop/admin"
	"github.com/pgmfa/pgmfa/mfa"
)

// approveFixture runs the admin API in-process on a unix socket in a temp
// dir, over a store enrolled by `pgmfa enroll`.
type approveFixture struct {
	sock  string
	store *mfa.FileStore
	appr  *mfa.Approvals
	now   time.Time
}

func newApproveFixture(t *testing.T) *approveFixture {
	t.Helper()
	dir := t.TempDir()
	storePath := filepath.Join(dir, "totp.json")
	if code, _, stderr := runEnrollT(t, "--store", storePath, "--qr=false", "alice"); code != 0 {
		t.Fatal(stderr)
	}
	store, err := mfa.OpenFileStore(storePath)
	if err != nil {
		t.Fatal(err)
	}
	f := &approveFixture{sock: filepath.Join(dir, "run", "admin.sock"), store: store, now: time.Now()}
	guard := mfa.NewGuard(mfa.Options{Now: func() time.Time { return f.now }}, store)
	f.appr = mfa.NewApprovals(guard)
	ln, err := admin.Listen(f.sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: admin.NewServer(f.appr, nil)}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	return f
}

func (f *approveFixture) code(t *testing.T) string {
	c, err := f.store.Code("alice", f.now)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func runApproveT(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := approve(args, strings.NewReader(stdin), &out, &errb)
	return code, out.String(), errb.String()
}

func TestApproveCommand(t *testing.T) {
	f := newApproveFixture(t)
	released := make(chan mfa.Outcome, 3)
	id1, _ := f.appr.Wait("alice", "192.0.2.1:5000", func(o mfa.Outcome) { released <- o })
	f.appr.Wait("alice", "192.0.2.2:5001", func(o mfa.Outcome) { released <- o })

	// --list.
	code, out, stderr := runApproveT(t, "", "--admin", f.sock, "--list")
	if code != 0 || !strings.Contains(out, "192.0.2.1:5000") || !strings.Contains(out, "192.0.2.2:5001") || !strings.Contains(out, "CONN") {
		t.Fatalf("--list: %d\n%s%s", code, out, stderr)
	}

	// A wrong code: exit 1, the message and the hint.
	wrong := "000000"
	if wrong == f.code(t) {
		wrong = "111111"
	}
	code, _, stderr = runApproveT(t, "", "--admin", f.sock, "alice", wrong)
	if code != 1 || !strings.Contains(stderr, "not valid") || !strings.Contains(stderr, "HINT:") {
		t.Fatalf("wrong code: %d %s", code, stderr)
	}

	// One connection, flags after the arguments.
	code, out, stderr = runApproveT(t, "", "alice", f.code(t), "--admin", f.sock, "--conn", strconv.FormatUint(id1, 10))
	if code != 0 || !strings.Contains(out, "released 1 login(s) of alice") || !strings.Contains(out, "192.0.2.1:5000") {
		t.Fatalf("approve --conn: %d\n%s%s", code, out, stderr)
	}
	if o := <-released; !o.OK {
		t.Fatal(o)
	}

	// The other one, the code read from stdin.
	f.now = f.now.Add(30 * time.Second)
	code, out, stderr = runApproveT(t, f.code(t)+"\n", "--admin", f.sock, "alice")
	if code != 0 || !strings.Contains(out, "192.0.2.2:5001") {
		t.Fatalf("code on stdin: %d\n%s%s", code, out, stderr)
	}
	<-released

	// Nobody waiting.
	code, out, _ = runApproveT(t, "", "--admin", f.sock, "--list")
	if code != 0 || !strings.Contains(out, "no logins are waiting") {
		t.Fatalf("empty --list: %d %s", code, out)
	}
	code, _, stderr = runApproveT(t, "", "--admin", f.sock, "alice", f.code(t))
	if code != 1 || !strings.Contains(stderr, "no login of user \"alice\" is waiting") {
		t.Fatalf("nobody waiting: %d %s", code, stderr)
	}
}

func TestApproveCommandErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "none.sock")
	code, _, stderr := runApproveT(t, "", "--admin", missing, "alice", "123456")
	if code != 1 || !strings.Contains(stderr, "cannot reach the pgmfa admin API") {
		t.Fatalf("%d %s", code, stderr)
	}
	if code, _, _ := runApproveT(t, ""); code != 2 {
		t.Fatal("no user: want exit 2")
	}
	if code, _, _ := runApproveT(t, "", "--list", "alice"); code != 2 {
		t.Fatal("--list with a user: want exit 2")
	}
	if code, _, _ := runApproveT(t, "", "--admin", missing, "alice"); code != 2 {
		t.Fatal("no code on stdin: want exit 2")
	}
	code, _, stderr = runApproveT(t, "", "--help")
	if code != 0 {
		t.Fatal("--help")
	}
	for _, f := range []string{"-admin", "-conn", "-list", "-timeout", "usage: pgmfa approve"} {
		if !strings.Contains(stderr, f) {
			t.Errorf("--help does not mention %s", f)
		}
	}
}
