package loop_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmfa/pgmfa/loop/admin"
	"github.com/pgmfa/pgmfa/mfa"
)

// serveAdmin runs the admin API over p's approvals on a unix socket and on
// loopback TCP (with a token) and returns a client for each.
func serveAdmin(t *testing.T, p *proxy) (unix, tcp admin.Client) {
	t.Helper()
	dir := t.TempDir()
	token, err := admin.LoadOrCreateToken(filepath.Join(dir, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	srv := admin.NewServer(p.appr, slog.New(slog.NewTextHandler(io.MultiWriter(p.logs, testWriter{t}), nil)), token)
	for _, addr := range []string{filepath.Join(dir, "admin.sock"), "127.0.0.1:0"} {
		ln, err := admin.Listen(addr)
		if err != nil {
			t.Fatal(err)
		}
		hs := srv.HTTPServer()
		go hs.Serve(ln)
		t.Cleanup(func() { hs.Close() })
		if admin.IsUnix(addr) {
			unix = admin.Client{Addr: addr}
		} else {
			tcp = admin.Client{Addr: ln.Addr().String(), Token: token}
		}
	}
	return unix, tcp
}

// waitingLogin starts a pgx login without a code (it waits for approval);
// its connection, or its error, arrives on the channel.
type loginResult struct {
	conn *pgx.Conn
	err  error
}

func startWaitingLogin(t *testing.T, p *proxy, appName string) <-chan loginResult {
	ch := make(chan loginResult, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, p.dsn(alice, alicePW, "app", "")+"&application_name="+appName)
		ch <- loginResult{c, err}
	}()
	t.Cleanup(func() {
		// The proxy's stop (registered earlier, run later) ends a login
		// still waiting; collect it.
		go func() {
			if r := <-ch; r.conn != nil {
				r.conn.Close(context.Background())
			}
		}()
	})
	return ch
}

// TestApprovalReleasesOnlyTheLoginItNames: two psql-like logins of alice
// wait (one may be whoever has her password). `pgmfa approve alice CODE`
// releases neither and lists both; `--conn ID` then releases exactly that
// one. The second login's arrival is logged as a warning with both
// addresses.
func TestApprovalReleasesOnlyTheLoginItNames(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	unix, _ := serveAdmin(t, p)
	ctx := context.Background()

	mine := startWaitingLogin(t, p, "mine")
	if !eventually(10*time.Second, func() bool { return len(p.appr.List()) == 1 }) {
		t.Fatal("the first login never started waiting")
	}
	theirs := startWaitingLogin(t, p, "theirs")
	if !eventually(10*time.Second, func() bool { return len(p.appr.List()) == 2 }) {
		t.Fatal("the second login never started waiting")
	}
	waiting := p.appr.List()
	first, second := waiting[0], waiting[1]
	if first.AppName != "mine" || second.AppName != "theirs" || first.Database != "app" || !strings.HasPrefix(first.Addr, "127.0.0.1:") {
		t.Fatalf("waiting logins: %+v", waiting)
	}
	// The warning is logged just after the second login is listed as
	// waiting, so it may trail the list by a moment.
	var logs string
	warned := func() bool {
		logs = p.logs.String()
		return strings.Contains(logs, "another login of the user is already waiting") &&
			strings.Contains(logs, "client="+second.Addr) && strings.Contains(logs, "waiting_client="+first.Addr)
	}
	if !eventually(5*time.Second, warned) {
		t.Fatalf("no warning naming both addresses:\n%s", logs)
	}
	// The connection id of the log is the approval id.
	if !strings.Contains(logs, `login waiting for MFA approval" conn=`+strconv.FormatUint(first.ID, 10)) {
		t.Fatalf("approval id %d is not the conn= of the log:\n%s", first.ID, logs)
	}

	code := p.code(alice)
	_, err := unix.Approve(ctx, alice, code, admin.ApproveOptions{})
	var e *admin.Error
	if !errors.As(err, &e) || e.Reason != mfa.ReasonSeveral || len(e.Waiting) != 2 ||
		e.Waiting[0].ID != first.ID || e.Waiting[1].ID != second.ID || e.Waiting[1].AppName != "theirs" {
		t.Fatalf("approval naming neither: %v", err)
	}
	if len(p.appr.List()) != 2 {
		t.Fatal("a login was released by an approval that named neither")
	}

	got, err := unix.Approve(ctx, alice, code, admin.ApproveOptions{ConnID: first.ID})
	if err != nil || len(got) != 1 || got[0].ID != first.ID {
		t.Fatalf("--conn %d: %+v %v", first.ID, got, err)
	}
	r := <-mine
	if r.err != nil {
		t.Fatalf("the approved login: %v", r.err)
	}
	var name string
	if err := r.conn.QueryRow(ctx, "select current_setting('application_name')").Scan(&name); err != nil || name != "mine" {
		t.Fatalf("the released session: %q %v", name, err)
	}
	r.conn.Close(ctx)
	if l := p.appr.List(); len(l) != 1 || l[0].ID != second.ID {
		t.Fatalf("after --conn: %+v still waiting, want only %d", l, second.ID)
	}
	select {
	case r := <-theirs:
		t.Fatalf("the other login finished: %v", r.err)
	default:
	}
}

// TestBadApprovalsDoNotLockOutTheUser: five bad approvals over the TCP admin
// API (the user's whole failure budget, before) leave the user able to log
// in with a valid code; they are charged to the approver.
func TestBadApprovalsDoNotLockOutTheUser(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	_, tcp := serveAdmin(t, p)
	ctx := context.Background()
	startWaitingLogin(t, p, "waits")
	if !eventually(10*time.Second, func() bool { return len(p.appr.List()) == 1 }) {
		t.Fatal("the login never started waiting")
	}
	bad := "000000"
	for bad == p.code(alice) {
		bad = "111111"
	}
	var e *admin.Error
	for i := 0; i < mfa.DefaultMaxFailures; i++ {
		if _, err := tcp.Approve(ctx, alice, bad, admin.ApproveOptions{}); !errors.As(err, &e) || e.Reason != mfa.ReasonBadCode {
			t.Fatalf("bad approval %d: %v", i, err)
		}
	}
	conn, err := pgx.Connect(ctx, p.dsn(alice, alicePW, "app", p.code(alice)))
	if err != nil {
		t.Fatalf("alice locked out by bad approvals: %v", err)
	}
	conn.Close(ctx)
	// The approver's budget is spent.
	if _, err := tcp.Approve(ctx, alice, bad, admin.ApproveOptions{}); !errors.As(err, &e) || e.Status != http.StatusTooManyRequests {
		t.Fatalf("approver past its budget: %v", err)
	}
	// Without the token: 401, and nothing charged to anyone.
	if _, err := (admin.Client{Addr: tcp.Addr}).Approve(ctx, alice, bad, admin.ApproveOptions{}); !errors.As(err, &e) || e.Status != http.StatusUnauthorized {
		t.Fatalf("no token: %v", err)
	}
}
