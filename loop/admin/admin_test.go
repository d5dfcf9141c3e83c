package admin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/loop/internal/testlog"

	"github.com/pgmfa/pgmfa/mfa"
)

// fixture is an enrolled user behind a Guard with a fixed clock, and the
// admin API serving it on ln.
type fixture struct {
	store *mfa.FileStore
	guard *mfa.Guard
	appr  *mfa.Approvals
	srv   *Server
	addr  string
	token string
	cl    Client
	logs  *syncBuffer
	now   time.Time
}

// syncBuffer collects the proxy's log for assertions.
type syncBuffer = testlog.Buffer

func start(t *testing.T, addr string) *fixture {
	t.Helper()
	f := &fixture{now: time.Unix(1_800_000_015, 0), logs: &syncBuffer{}}
	store, err := mfa.OpenFileStore(filepath.Join(t.TempDir(), "totp.json"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.Enroll("alice", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	f.store = store
	f.guard = mfa.NewGuard(mfa.Options{Now: func() time.Time { return f.now }}, store)
	f.appr = mfa.NewApprovals(f.guard)
	f.token, err = LoadOrCreateToken(filepath.Join(t.TempDir(), "run", "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	f.srv = NewServer(f.appr, slog.New(slog.NewTextHandler(f.logs, nil)), f.token)
	ln, err := Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	hs := f.srv.HTTPServer()
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	f.addr = addr
	if !IsUnix(addr) {
		f.addr = ln.Addr().String()
	}
	f.cl = Client{Addr: f.addr, Token: f.token}
	return f
}

func (f *fixture) code(t *testing.T) string {
	c, err := f.store.Code("alice", f.now)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (f *fixture) wrongCode(t *testing.T) string {
	good := map[string]bool{}
	for d := -1; d <= 1; d++ {
		c, _ := f.store.Code("alice", f.now.Add(time.Duration(d)*30*time.Second))
		good[c] = true
	}
	for _, c := range []string{"000000", "111111", "222222", "333333"} {
		if !good[c] {
			return c
		}
	}
	t.Fatal("no wrong code")
	return ""
}

func TestUnixSocketEndToEnd(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	sock := filepath.Join(dir, "admin.sock")
	f := start(t, sock)
	ctx := context.Background()

	di, err := os.Stat(dir)
	if err != nil || di.Mode().Perm() != 0o700 {
		t.Fatalf("socket directory: %v %v", di.Mode(), err)
	}
	si, err := os.Stat(sock)
	if err != nil || si.Mode()&os.ModeSocket == 0 || si.Mode().Perm() != 0o600 {
		t.Fatalf("socket: %v %v", si.Mode(), err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("the directory holds %d entries", len(entries))
	}
	if status, body := f.get(t, "/v1/healthz"); status != http.StatusOK {
		t.Fatalf("healthz: %d %s", status, body)
	}

	// Two logins wait.
	released := make(chan uint64, 2)
	p1, _, _, _ := f.appr.Wait(mfa.Login{ConnID: 11, User: "alice", Addr: "192.0.2.1:5000", Database: "app", AppName: "psql"}, func(o mfa.Outcome) {
		if o.OK {
			released <- 11
		}
	})
	f.appr.Wait(mfa.Login{ConnID: 12, User: "alice", Addr: "192.0.2.2:5000", Database: "app"}, func(o mfa.Outcome) {
		if o.OK {
			released <- 12
		}
	})
	pending, err := f.cl.List(ctx)
	if err != nil || len(pending) != 2 || pending[0].ID != p1.ID || pending[0].User != "alice" || pending[0].Addr != "192.0.2.1:5000" ||
		pending[0].Database != "app" || pending[0].AppName != "psql" || !pending[0].Since.Equal(f.now) {
		t.Fatalf("List: %+v %v", pending, err)
	}

	// A wrong code: an *Error with the message and hint, nobody released.
	wrong := f.wrongCode(t)
	_, err = f.cl.Approve(ctx, "alice", wrong, ApproveOptions{ConnID: 11})
	var e *Error
	if !errors.As(err, &e) || e.Reason != mfa.ReasonBadCode || e.Status != http.StatusForbidden || e.Hint == "" || !strings.Contains(e.Message, "not valid") {
		t.Fatalf("wrong code: %#v", err)
	}
	if len(released) != 0 {
		t.Fatal("released with a wrong code")
	}

	// Neither named: 409, none released, both listed.
	_, err = f.cl.Approve(ctx, "alice", f.code(t), ApproveOptions{})
	if !errors.As(err, &e) || e.Status != http.StatusConflict || e.Reason != mfa.ReasonSeveral || len(e.Waiting) != 2 || e.Waiting[1].ID != 12 {
		t.Fatalf("ambiguous: %#v", err)
	}
	if len(released) != 0 {
		t.Fatal("released by an approval that named none of two")
	}

	// Only one connection.
	got, err := f.cl.Approve(ctx, "alice", f.code(t), ApproveOptions{ConnID: 11})
	if err != nil || len(got) != 1 || got[0].ID != 11 {
		t.Fatalf("approve one: %+v %v", got, err)
	}
	if <-released != 11 {
		t.Fatal("wrong login released")
	}
	// The only one left, with the next code.
	f.now = f.now.Add(30 * time.Second)
	got, err = f.cl.Approve(ctx, "alice", f.code(t), ApproveOptions{})
	if err != nil || len(got) != 1 || got[0].Addr != "192.0.2.2:5000" {
		t.Fatalf("approve rest: %+v %v", got, err)
	}
	// Nobody waits now.
	_, err = f.cl.Approve(ctx, "alice", f.code(t), ApproveOptions{})
	if !errors.As(err, &e) || e.Reason != mfa.ReasonNotWaiting || e.Status != http.StatusNotFound {
		t.Fatalf("nobody waiting: %v", err)
	}

	// Codes never reach the log; approvals do.
	logs := f.logs.String()
	for _, c := range []string{wrong, f.code(t)} {
		if strings.Contains(logs, c) {
			t.Fatalf("the log contains a code:\n%s", logs)
		}
	}
	if !strings.Contains(logs, "admin approval") || !strings.Contains(logs, "user=alice") ||
		!strings.Contains(logs, fmt.Sprintf("approver_uid=%d", os.Getuid())) {
		t.Fatalf("no approval log line:\n%s", logs)
	}

	// Stats: absent until set.
	if status, body := f.get(t, "/v1/stats"); status != http.StatusNotFound {
		t.Fatalf("stats unset: %d %s", status, body)
	}
	f.srv.SetStats(func() any { return map[string]int{"active": 3} })
	if status, body := f.get(t, "/v1/stats"); status != http.StatusOK || !strings.Contains(body, `"active": 3`) {
		t.Fatalf("stats: %d %s", status, body)
	}
}

// get does one GET on the fixture's unix socket, as curl --unix-socket
// would: the CLI's Client has no call for health and stats (nothing in the
// product reads them), but the endpoints are served.
func (f *fixture) get(t *testing.T, path string) (int, string) {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return net.Dial("unix", f.addr)
	}}}
	resp, err := c.Get("http://x" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func TestBadRequests(t *testing.T) {
	f := start(t, filepath.Join(t.TempDir(), "admin.sock"))
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return net.Dial("unix", f.addr)
	}}}
	for _, body := range []string{`{`, `{"user":"alice"}`, `{"user":"alice","code":"1","extra":1}`, `{"user":"alice","code":"123456"} {}`} {
		resp, err := c.Post("http://x/v1/approve", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: status %d", body, resp.StatusCode)
		}
	}
	resp, err := c.Get("http://x/v1/approve")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET approve: %d", resp.StatusCode)
	}
}

func TestLoopbackTCP(t *testing.T) {
	f := start(t, "127.0.0.1:0")
	f.appr.Wait(mfa.Login{User: "alice", Addr: "192.0.2.1:1"}, func(mfa.Outcome) {})
	got, err := f.cl.Approve(context.Background(), "alice", f.code(t), ApproveOptions{})
	if err != nil || len(got) != 1 {
		t.Fatalf("%+v %v", got, err)
	}
	if !strings.Contains(f.logs.String(), "approver=token") {
		t.Fatalf("approval not logged with its approver:\n%s", f.logs.String())
	}
}

func TestListenRefusesNonLoopback(t *testing.T) {
	for _, addr := range []string{":0", "0.0.0.0:0", "[::]:0", "192.0.2.1:0", "@pgmfa"} {
		ln, err := Listen(addr)
		if err == nil {
			ln.Close()
			t.Errorf("%s: accepted", addr)
			continue
		}
		if !strings.Contains(err.Error(), "loopback") && !strings.Contains(err.Error(), "abstract") {
			t.Errorf("%s: unclear error: %v", addr, err)
		}
	}
}

func TestListenSocketLifecycle(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "admin.sock")

	// A stale socket (its listener gone without cleanup) is replaced.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	ln, err := Listen(sock)
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	// A live one is refused.
	if ln2, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "in use") {
		if ln2 != nil {
			ln2.Close()
		}
		t.Fatalf("live socket: %v", err)
	}
	if ln.Addr().String() != sock {
		t.Fatalf("Addr %s", ln.Addr())
	}
	// Close removes the socket.
	ln.Close()
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after Close: %v", err)
	}
	// A regular file is not ours to remove.
	os.WriteFile(sock, []byte("x"), 0o600)
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("regular file: %v", err)
	}
}

func TestClientUnreachable(t *testing.T) {
	_, err := Client{Addr: filepath.Join(t.TempDir(), "none.sock")}.List(context.Background())
	if err == nil || !strings.Contains(err.Error(), "is `pgmfa serve` running") {
		t.Fatalf("%v", err)
	}
}
