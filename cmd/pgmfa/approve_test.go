package main

import (
	"bytes"
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
	tcp   string // the same API on loopback TCP
	token string // its token file
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
	f.token = filepath.Join(dir, "run", "admin.token")
	tok, err := admin.LoadOrCreateToken(f.token)
	if err != nil {
		t.Fatal(err)
	}
	srv := admin.NewServer(f.appr, nil, tok)
	for _, addr := range []string{f.sock, "127.0.0.1:0"} {
		ln, err := admin.Listen(addr)
		if err != nil {
			t.Fatal(err)
		}
		hs := srv.HTTPServer()
		go hs.Serve(ln)
		t.Cleanup(func() { hs.Close() })
		if !admin.IsUnix(addr) {
			f.tcp = ln.Addr().String()
		}
	}
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
	p1, _, _, _ := f.appr.Wait(mfa.Login{ConnID: 7, User: "alice", Addr: "192.0.2.1:5000", Database: "app", AppName: "psql"}, func(o mfa.Outcome) { released <- o })
	id1 := p1.ID
	f.appr.Wait(mfa.Login{ConnID: 8, User: "alice", Addr: "192.0.2.2:5001", Database: "prod", AppName: "x\x1b[2Jy"}, func(o mfa.Outcome) { released <- o })

	// --list.
	code, out, stderr := runApproveT(t, "", "--admin", f.sock, "--list")
	if code != 0 || !strings.Contains(out, "192.0.2.1:5000") || !strings.Contains(out, "192.0.2.2:5001") || !strings.Contains(out, "CONN") ||
		!strings.Contains(out, "DATABASE") || !strings.Contains(out, "APPLICATION") || !strings.Contains(out, "prod") || !strings.Contains(out, "x?[2Jy") {
		t.Fatalf("--list: %d\n%s%s", code, out, stderr)
	}

	// Two wait and the approval names neither: none released, both listed.
	code, out, stderr = runApproveT(t, "", "--admin", f.sock, "alice", f.code(t))
	if code != 1 || out != "" || !strings.Contains(stderr, "2 logins of alice are waiting; none was released") ||
		!strings.Contains(stderr, "--conn") || !strings.Contains(stderr, "192.0.2.1:5000") || !strings.Contains(stderr, "192.0.2.2:5001") || !strings.Contains(stderr, "psql") {
		t.Fatalf("ambiguous approve: %d\n%s%s", code, out, stderr)
	}
	if len(released) != 0 {
		t.Fatal("a login was released by an approval that named none of two")
	}
	if code, _, stderr = runApproveT(t, "", "--admin", f.sock, "--conn", "7", "--all", "alice", f.code(t)); code != 2 {
		t.Fatalf("--conn with --all: %d %s", code, stderr)
	}

	// A wrong code: exit 1, the message and the hint.
	wrong := "000000"
	if wrong == f.code(t) {
		wrong = "111111"
	}
	code, _, stderr = runApproveT(t, "", "--admin", f.sock, "--conn", "7", "alice", wrong)
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

	// The only one left, the code read from stdin, over TCP with the token.
	f.now = f.now.Add(30 * time.Second)
	code, out, stderr = runApproveT(t, f.code(t)+"\n", "--admin", f.tcp, "--admin-token-file", f.token, "alice")
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
	// TCP without the token file.
	code, _, stderr = runApproveT(t, "", "--admin", f.tcp, "--admin-token-file", filepath.Join(t.TempDir(), "none"), "--list")
	if code != 1 || !strings.Contains(stderr, "admin token") {
		t.Fatalf("TCP without a token: %d %s", code, stderr)
	}
}

// TestApproveAllCommand: --all releases every waiting login of the user.
func TestApproveAllCommand(t *testing.T) {
	f := newApproveFixture(t)
	released := make(chan mfa.Outcome, 2)
	f.appr.Wait(mfa.Login{ConnID: 1, User: "alice", Addr: "192.0.2.1:5000"}, func(o mfa.Outcome) { released <- o })
	f.appr.Wait(mfa.Login{ConnID: 2, User: "alice", Addr: "192.0.2.2:5000"}, func(o mfa.Outcome) { released <- o })
	code, out, stderr := runApproveT(t, "", "--admin", f.sock, "--all", "alice", f.code(t))
	if code != 0 || !strings.Contains(out, "released 2 login(s) of alice") || len(released) != 2 {
		t.Fatalf("--all: %d\n%s%s", code, out, stderr)
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
	for _, f := range []string{"-admin", "-admin-token-file", "-conn", "-all", "RISK", "-list", "-timeout", "usage: pgmfa approve"} {
		if !strings.Contains(stderr, f) {
			t.Errorf("--help does not mention %s", f)
		}
	}
}
