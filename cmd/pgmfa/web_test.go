package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/loop/tlsproxy/testpki"
)

// TestServeWeb runs the binary with --web (reusing --tls-cert) and
// --mfa-webhook in front of a real PostgreSQL: a login without a code is
// refused with a link to the page, the webhook gets the same link, and the
// page answers it over TLS. Misused flags stop the start.
func TestServeWeb(t *testing.T) {
	bin := buildBinary(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--web", "0.0.0.0:0", "--web-url", "http://x", "--web-insecure-loopback"}, "loopback"},
		{[]string{"--web", "127.0.0.1:0"}, "needs a certificate"},
		{[]string{"--web", ":0", "--web-cert", "x.pem", "--web-key", "x.key"}, "give --web-url"},
		{[]string{"--mfa-webhook", "http://127.0.0.1:1/"}, "need --web"},
		{[]string{"--web", "127.0.0.1:0", "--web-insecure-loopback", "--mfa-webhook", "ftp://x"}, "--mfa-webhook must be"},
		{[]string{"--web", "127.0.0.1:0", "--web-insecure-loopback", "--web-mode", "push"}, "--web-mode must be"},
	} {
		cmd := exec.Command(bin, append([]string{"serve", "--listen", "127.0.0.1:0", "--store", filepath.Join(t.TempDir(), "s.json"),
			"--store-key-file", "", "--admin", ""}, tc.args...)...)
		cmd.Env = append(os.Environ(), "PGMFA_STORE_KEY=")
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "cannot start") || !strings.Contains(string(out), tc.want) {
			t.Fatalf("serve %v: want a refusal saying %q; got %v\n%s", tc.args, tc.want, err, out)
		}
	}

	events := make(chan map[string]any, 4)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var e map[string]any
		if json.NewDecoder(r.Body).Decode(&e) == nil {
			events <- e
		}
	}))
	defer hook.Close()

	db := pgtest.Start(t, pgcluster.Options{Users: []pgcluster.User{{Name: "alice", Password: fleetPW}}, Databases: []string{"app"}})
	dir := t.TempDir()
	store := filepath.Join(dir, "totp.json")
	enroll := exec.Command(bin, "enroll", "--store", store, "--store-key-file", "", "--qr=false", "alice")
	enroll.Env = append(os.Environ(), "PGMFA_STORE_KEY=")
	if out, err := enroll.CombinedOutput(); err != nil {
		t.Fatalf("enroll: %v\n%s", err, out)
	}
	port, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	wport, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	pki, err := testpki.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pki.Close() })
	webAddr := "127.0.0.1:" + strconv.Itoa(wport)
	cmd := exec.Command(bin, "serve", "--listen", "127.0.0.1:"+strconv.Itoa(port), "--upstream", db.Addr(),
		"--store", store, "--store-key-file", "", "--admin", "", "--loops", "1",
		"--tls-cert", pki.CertFile, "--tls-key", pki.KeyFile, "--web", webAddr, "--mfa-webhook", hook.URL)
	cmd.Env = append(os.Environ(), "PGMFA_STORE_KEY=")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var logs strings.Builder
	done := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			mu.Lock()
			logs.WriteString(sc.Text() + "\n")
			mu.Unlock()
		}
		_ = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			mu.Lock()
			t.Logf("pgmfa serve log:\n%s", logs.String())
			mu.Unlock()
		}
	})
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pki.Pool}}}
	if !eventually(30*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
		if err != nil {
			return false
		}
		c.Close()
		resp, err := client.Get("https://" + webAddr + "/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}) {
		t.Fatal("pgmfa serve --web did not start")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgcluster.DSN("127.0.0.1", port, "alice", fleetPW, "app"))
	if err == nil {
		conn.Close(ctx)
		t.Fatal("a login without a code got in")
	}
	var pgErr *pgconn.PgError
	link := regexp.MustCompile(`https://127\.0\.0\.1:\d+/l/[A-Za-z0-9_-]{43}`).FindString(hintOf(err, &pgErr))
	if pgErr == nil || pgErr.Code != "28000" || !strings.HasPrefix(link, "https://"+webAddr+"/l/") {
		t.Fatalf("want 28000 with a link to %s: %v", webAddr, err)
	}
	select {
	case e := <-events:
		if e["approval_url"] != link || e["user"] != "alice" || e["event"] != "login_refused" {
			t.Fatalf("webhook event %v, link %s", e, link)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no webhook event")
	}
	resp, err := client.Get(link)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), `action="/signin"`) || !strings.Contains(resp.Header.Get("Set-Cookie"), "__Host-pgmfa_pre=") ||
		!strings.Contains(resp.Header.Get("Set-Cookie"), "Secure") || !strings.Contains(resp.Header.Get("Set-Cookie"), "SameSite=Strict") {
		t.Fatalf("link page: %d %v\n%s", resp.StatusCode, resp.Header, body)
	}
	// The link's secret is not in the log.
	mu.Lock()
	defer mu.Unlock()
	if tok := link[strings.LastIndex(link, "/")+1:]; strings.Contains(logs.String(), tok) {
		t.Fatal("the link's token is in the log")
	}
}

func hintOf(err error, pgErr **pgconn.PgError) string {
	if errors.As(err, pgErr) {
		return (*pgErr).Hint
	}
	return ""
}
