package admin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pgmfa/pgmfa/mfa"
)

// rawTCP sends one request to the fixture's TCP address with the headers
// given (a browser, curl, a forged client) and returns the status.
func rawTCP(t *testing.T, f *fixture, method, path, body string, hdr map[string]string) int {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+f.addr+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		if k == "Host" {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	resp, err := (&http.Client{Transport: &http.Transport{}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestTCPRequiresToken: over TCP every endpoint answers 401 without the
// token (any local account could reach the port), and works with it.
func TestTCPRequiresToken(t *testing.T) {
	f := start(t, "127.0.0.1:0")
	f.appr.Wait(mfa.Login{User: "alice", Addr: "192.0.2.1:1"}, func(mfa.Outcome) {})
	approve := `{"user":"alice","code":"` + f.code(t) + `"}`
	for _, c := range []struct{ method, path, body string }{
		{"GET", "/v1/pending", ""}, {"GET", "/v1/stats", ""}, {"GET", "/v1/healthz", ""}, {"POST", "/v1/approve", approve},
	} {
		for name, auth := range map[string]string{"none": "", "wrong": "Bearer " + strings.Repeat("0", 64), "basic": "Basic " + f.token} {
			hdr := map[string]string{"Content-Type": "application/json"}
			if auth != "" {
				hdr["Authorization"] = auth
			}
			if st := rawTCP(t, f, c.method, c.path, c.body, hdr); st != http.StatusUnauthorized {
				t.Errorf("%s %s with %s token: %d, want 401", c.method, c.path, name, st)
			}
		}
	}
	if len(f.appr.List()) != 1 {
		t.Fatal("a request without the token released a login")
	}
	// The client without a token gets the hint.
	_, err := Client{Addr: f.addr}.List(context.Background())
	var e *Error
	if !errors.As(err, &e) || e.Status != http.StatusUnauthorized || !strings.Contains(e.Hint, "--admin-token-file") {
		t.Fatalf("client without token: %v", err)
	}
	// With the token.
	if st := rawTCP(t, f, "GET", "/v1/pending", "", map[string]string{"Authorization": "Bearer " + f.token}); st != http.StatusOK {
		t.Fatalf("with the token: %d", st)
	}
	if got, err := f.cl.Approve(context.Background(), "alice", f.code(t), ApproveOptions{}); err != nil || len(got) != 1 {
		t.Fatalf("approve with the token: %v %v", got, err)
	}
	if strings.Contains(f.logs.String(), f.token) {
		t.Fatal("the token reached the log")
	}
}

// TestBrowserRequestsRefused: what a web page the host's browser opens can
// send — a cross-site "simple" POST, a fetch, a DNS-rebound name — is
// refused, token or not, on TCP and on the unix socket.
func TestBrowserRequestsRefused(t *testing.T) {
	f := start(t, "127.0.0.1:0")
	f.appr.Wait(mfa.Login{User: "alice", Addr: "192.0.2.1:1"}, func(mfa.Outcome) {})
	approve := `{"user":"alice","code":"` + f.code(t) + `"}`
	_, port, _ := net.SplitHostPort(f.addr)
	bearer := "Bearer " + f.token
	for _, c := range []struct {
		name string
		hdr  map[string]string
		want int
	}{
		{"cross-site form", map[string]string{"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403},
		{"cross-site form with token", map[string]string{"Origin": "null", "Content-Type": "application/x-www-form-urlencoded", "Authorization": bearer}, 403},
		{"fetch", map[string]string{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Content-Type": "text/plain", "Authorization": bearer}, 403},
		{"rebound host", map[string]string{"Host": "evil.example:" + port, "Content-Type": "application/json", "Authorization": bearer}, 403},
		{"other port", map[string]string{"Host": "127.0.0.1:1", "Content-Type": "application/json", "Authorization": bearer}, 403},
		{"text/plain", map[string]string{"Content-Type": "text/plain", "Authorization": bearer}, 415},
		{"no content type", map[string]string{"Authorization": bearer}, 415},
	} {
		if st := rawTCP(t, f, "POST", "/v1/approve", approve, c.hdr); st != c.want {
			t.Errorf("%s: %d, want %d", c.name, st, c.want)
		}
	}
	// localhost with the port is the listen address too.
	if st := rawTCP(t, f, "GET", "/v1/healthz", "", map[string]string{"Host": "localhost:" + port, "Authorization": bearer}); st != 200 {
		t.Errorf("localhost:%s: %d", port, st)
	}
	if len(f.appr.List()) != 1 {
		t.Fatal("a browser-like request released a login")
	}

	// The unix socket refuses browsers too.
	u := start(t, filepath.Join(t.TempDir(), "admin.sock"))
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return net.Dial("unix", u.addr)
	}}}
	req, _ := http.NewRequest("POST", "http://x/v1/approve", strings.NewReader(approve))
	req.Header.Set("Origin", "http://evil.example")
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("unix socket, Origin: %d", resp.StatusCode)
	}
}

// TestBadApprovalsChargedToApprover: five bad approvals (the user's failure
// budget) do not lock the user out: the user then logs in with a valid
// code. The approver is throttled after its own budget, and logged by uid.
func TestBadApprovalsChargedToApprover(t *testing.T) {
	f := start(t, filepath.Join(t.TempDir(), "admin.sock"))
	ctx := context.Background()
	f.appr.Wait(mfa.Login{User: "alice", Addr: "192.0.2.1:1"}, func(mfa.Outcome) {})
	wrong := f.wrongCode(t)
	var e *Error
	for i := 0; i < mfa.DefaultMaxFailures; i++ {
		if _, err := f.cl.Approve(ctx, "alice", wrong, ApproveOptions{}); !errors.As(err, &e) || e.Reason != mfa.ReasonBadCode {
			t.Fatalf("bad approval %d: %v", i, err)
		}
	}
	if o := f.guard.Verify("alice", "192.0.2.1:2", f.code(t)); !o.OK {
		t.Fatalf("the user is locked out after %d bad approvals: %+v", mfa.DefaultMaxFailures, o)
	}
	_, err := f.cl.Approve(ctx, "alice", wrong, ApproveOptions{})
	if !errors.As(err, &e) || e.Status != http.StatusTooManyRequests || !strings.Contains(e.Message, "approver") {
		t.Fatalf("approver past its budget: %v", err)
	}
	if !strings.Contains(f.logs.String(), fmt.Sprintf("approver=uid:%d", os.Getuid())) {
		t.Fatalf("refused approvals not logged with the approver's uid:\n%s", f.logs.String())
	}
}

func TestTokenFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "admin.token")
	tok, err := LoadOrCreateToken(path)
	if err != nil || len(tok) != 64 {
		t.Fatalf("%q %v", tok, err)
	}
	fi, _ := os.Stat(path)
	di, _ := os.Stat(filepath.Dir(path))
	if fi.Mode().Perm() != 0o600 || di.Mode().Perm() != 0o700 {
		t.Fatalf("token file %04o, directory %04o", fi.Mode().Perm(), di.Mode().Perm())
	}
	if again, err := LoadOrCreateToken(path); err != nil || again != tok {
		t.Fatalf("second start: %q %v", again, err)
	}
	if read, err := ReadToken(path); err != nil || read != tok {
		t.Fatalf("ReadToken: %q %v", read, err)
	}
	os.Chmod(path, 0o640)
	if _, err := LoadOrCreateToken(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("group-readable token: %v", err)
	}
	os.WriteFile(path, []byte("short\n"), 0o600)
	os.Chmod(path, 0o600)
	if _, err := LoadOrCreateToken(path); err == nil {
		t.Fatal("short token accepted")
	}
	if _, err := ReadToken(filepath.Join(t.TempDir(), "none")); err == nil || !strings.Contains(err.Error(), "--admin-token-file") {
		t.Fatalf("missing token: %v", err)
	}
}
