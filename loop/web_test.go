package loop_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/loop/tlsproxy/testpki"
	"github.com/pgmfa/pgmfa/loop/web"
	"github.com/pgmfa/pgmfa/mfa"
)

// webProxy is a proxy with the approval page over TLS (the test PKI),
// in front of the shared cluster.
type webProxy struct {
	*proxy
	page   *web.Server
	base   string        // https://127.0.0.1:PORT
	skew   *atomic.Int64 // added to the page's clock, ns
	client *http.Client
	pool   *tls.Config
}

func startWebProxy(t *testing.T, mode string, hook *web.Webhook) *webProxy {
	t.Helper()
	pki, err := testpki.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pki.Close() })
	certs, err := tlsproxy.LoadCerts(pki.CertFile, pki.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	wp := &webProxy{skew: &atomic.Int64{}}
	ln, err := web.Listen("127.0.0.1:0", func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return certs.Current(), nil }, false)
	if err != nil {
		t.Fatal(err)
	}
	wp.base = "https://" + ln.Addr().String()
	wp.proxy = startProxy(t, mfa.Options{MaxFailures: 3}, func(c *loop.Config) {
		page, err := web.New(web.Config{
			Guard: c.Guard, Approvals: c.Approvals, URL: wp.base, Mode: mode, Webhook: hook, Secure: true,
			Logger: c.Logger, Now: func() time.Time { return time.Now().Add(time.Duration(wp.skew.Load())) },
		})
		if err != nil {
			t.Fatal(err)
		}
		wp.page, c.Web = page, page
	})
	hs := wp.page.HTTPServer()
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	wp.pool = &tls.Config{RootCAs: pki.Pool}
	wp.client = wp.newClient(t)
	return wp
}

// newClient is a browser without JavaScript: a cookie jar, no redirects
// followed (the test looks at each answer).
func (wp *webProxy) newClient(t *testing.T) *http.Client {
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{
		Jar: jar, Timeout: 30 * time.Second,
		Transport:     &http.Transport{TLSClientConfig: wp.pool.Clone()},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// get and post return the status and body.
func (wp *webProxy) get(t *testing.T, c *http.Client, u string) (int, string) {
	t.Helper()
	resp, err := c.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	return readResp(t, resp)
}

func (wp *webProxy) post(t *testing.T, c *http.Client, path string, form url.Values) (int, string) {
	t.Helper()
	resp, err := c.PostForm(wp.base+path, form)
	if err != nil {
		t.Fatal(err)
	}
	return readResp(t, resp)
}

func readResp(t *testing.T, resp *http.Response) (int, string) {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") {
		t.Fatalf("no strict CSP: %q", csp)
	}
	return resp.StatusCode, string(b)
}

var (
	linkRE = regexp.MustCompile(`https://127\.0\.0\.1:\d+/l/[A-Za-z0-9_-]{43}`)
	csrfRE = regexp.MustCompile(`name="csrf" value="([^"]+)"`)
)

func csrfOf(t *testing.T, body string) string {
	t.Helper()
	m := csrfRE.FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no CSRF field in:\n%s", body)
	}
	return m[1]
}

// rowID is the login id in the page's form for the row of client addr.
func rowID(t *testing.T, body, addrPrefix string) string {
	t.Helper()
	i := strings.Index(body, "<td>"+addrPrefix)
	if i < 0 {
		t.Fatalf("no row for %s in:\n%s", addrPrefix, body)
	}
	m := regexp.MustCompile(`name="id" value="(\d+)"`).FindStringSubmatch(body[i:])
	if m == nil {
		t.Fatalf("no id for %s", addrPrefix)
	}
	return m[1]
}

// psqlFrom runs psql as user (code: none when empty) against the proxy
// at host.
func (wp *webProxy) psqlFrom(host, user, password, code, sql string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
		"-h", host, "-p", strconv.Itoa(wp.port), "-U", user, "-d", "app", "-c", sql)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+password, "PGSSLMODE=disable", "PGCONNECT_TIMEOUT=30", "PGAPPNAME=psql-web")
	if code != "" {
		cmd.Env = append(cmd.Env, "PGOPTIONS=-c pgmfa.code="+code)
	} else {
		cmd.Env = append(cmd.Env, "PGOPTIONS=")
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return strings.TrimSpace(stdout.String()), strings.TrimSpace(stderr.String()), err
}

// refusedFrom2 logs in with pgx from source address 127.0.0.2 (psql
// cannot choose its source address, and loopback otherwise always answers
// from 127.0.0.1) without a code and returns the link of the refusal.
func (wp *webProxy) refusedFrom2(t *testing.T, user, password string) string {
	t.Helper()
	cfg, err := pgx.ParseConfig(wp.dsn(user, password, "app", "") + "&application_name=pgx-other")
	if err != nil {
		t.Fatal(err)
	}
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 30 * time.Second}
	cfg.DialFunc = d.DialContext
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err == nil {
		conn.Close(ctx)
		t.Fatalf("a login from 127.0.0.2 without a code got in")
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "28000" || !linkRE.MatchString(pgErr.Hint) {
		t.Fatalf("a login from 127.0.0.2: want 28000 with a link in the HINT, got %v", err)
	}
	return linkRE.FindString(pgErr.Hint)
}

// refused runs psql without a code and returns the link of its HINT.
func (wp *webProxy) refused(t *testing.T, host, user, password string) string {
	t.Helper()
	out, stderr, err := wp.psqlFrom(host, user, password, "", "select 'IN'")
	if err == nil || out != "" || !strings.Contains(stderr, "28000") && !strings.Contains(stderr, "MFA approval needed") || !strings.Contains(stderr, "HINT") {
		t.Fatalf("psql without a code from %s: want a refusal with a HINT; got %v\n%s\n%s", host, err, out, stderr)
	}
	link := linkRE.FindString(stderr)
	if link == "" {
		t.Fatalf("no link in the HINT:\n%s", stderr)
	}
	return link
}

// signInLink signs c in through a link with code; returns the home page.
func (wp *webProxy) signInLink(t *testing.T, c *http.Client, link, code string) (int, string) {
	t.Helper()
	status, body := wp.get(t, c, link)
	if status != 200 || !strings.Contains(body, `action="/signin"`) {
		t.Fatalf("link page: %d\n%s", status, body)
	}
	token := link[strings.LastIndex(link, "/")+1:]
	status, body = wp.post(t, c, "/signin", url.Values{"csrf": {csrfOf(t, body)}, "token": {token}, "code": {code}})
	if status != http.StatusSeeOther {
		return status, body
	}
	return wp.get(t, c, wp.base+"/")
}

// TestWebApprovalRefer drives --web in refer mode with psql and a cookie-jar
// HTTP client over TLS: the refusal carries a one-time link; signing in
// spends the code; approving admits the retry from the same address only;
// the link is single use and expires; deny, CSRF, throttling, another
// user's login and an oversized body are refused; forms only, no script.
func TestWebApprovalRefer(t *testing.T) {
	wp := startWebProxy(t, web.ModeRefer, nil)
	c := wp.client

	// 1. No code: refused at once with the link; nothing reached the
	// database beyond the password check.
	link := wp.refused(t, "127.0.0.1", alice, alicePW)

	// The page works without JavaScript: forms only, no script at all.
	status, body := wp.get(t, c, link)
	if status != 200 || strings.Contains(strings.ToLower(body), "<script") || !strings.Contains(body, `<form method="post" action="/signin">`) ||
		!strings.Contains(body, "127.0.0.1:") || !strings.Contains(body, "psql-web") {
		t.Fatalf("link page: %d\n%s", status, body)
	}
	token := link[strings.LastIndex(link, "/")+1:]
	pre := csrfOf(t, body)

	// CSRF missing or wrong: 403, nothing checked.
	if st, _ := wp.post(t, c, "/signin", url.Values{"token": {token}, "code": {wp.code(alice)}}); st != http.StatusForbidden {
		t.Fatalf("sign-in without CSRF: %d", st)
	}
	if st, _ := wp.post(t, c, "/signin", url.Values{"csrf": {pre + "x"}, "token": {token}, "code": {wp.code(alice)}}); st != http.StatusForbidden {
		t.Fatalf("sign-in with a wrong CSRF token: %d", st)
	}
	// A client without the pre-session cookie (another site's form) cannot
	// submit either, even with a token it read earlier.
	if st, _ := wp.post(t, wp.newClient(t), "/signin", url.Values{"csrf": {pre}, "token": {token}, "code": {wp.code(alice)}}); st != http.StatusForbidden {
		t.Fatalf("sign-in without the CSRF cookie: %d", st)
	}

	// A wrong code: refused, the link still works.
	wrong := "000000"
	if wrong == wp.code(alice) {
		wrong = "111111"
	}
	if st, b := wp.post(t, c, "/signin", url.Values{"csrf": {pre}, "token": {token}, "code": {wrong}}); st != http.StatusUnauthorized || !strings.Contains(b, "not valid") {
		t.Fatalf("wrong code: %d\n%s", st, b)
	}

	// 2. Sign in with the code: the home page lists the refused login.
	code := wp.code(alice)
	status, body = wp.signInLink(t, c, link, code)
	if status != 200 || !strings.Contains(body, "Signed in as <code>alice</code>") || !strings.Contains(body, "<td>app</td>") ||
		!strings.Contains(body, "<td>psql-web</td>") || !strings.Contains(body, `value="approve"`) {
		t.Fatalf("home after sign-in: %d\n%s", status, body)
	}
	sessCSRF := csrfOf(t, body)
	id := rowID(t, body, "127.0.0.1:")

	// The link is single use: it signed us in, it opens nothing more.
	if st, _ := wp.get(t, wp.newClient(t), link); st != http.StatusGone {
		t.Fatalf("reused link: %d, want 410", st)
	}
	// The code spent on the page is spent on the wire too.
	if _, stderr, err := wp.psqlFrom("127.0.0.1", alice, alicePW, code, "select 1"); err == nil || !strings.Contains(stderr, "already used") {
		t.Fatalf("the page's code replayed on the wire: %v %s", err, stderr)
	}
	// Not approved yet: still refused.
	wp.refused(t, "127.0.0.1", alice, alicePW)

	// 3. Decide: CSRF missing or wrong is 403 and approves nothing.
	for _, f := range []url.Values{
		{"kind": {"link"}, "id": {id}, "action": {"approve"}},
		{"csrf": {pre}, "kind": {"link"}, "id": {id}, "action": {"approve"}},
	} {
		if st, _ := wp.post(t, c, "/decide", f); st != http.StatusForbidden {
			t.Fatalf("decide with CSRF %q: %d", f.Get("csrf"), st)
		}
	}
	wp.refused(t, "127.0.0.1", alice, alicePW)

	// Approve: the retry from the same address gets in, without a code.
	if st, b := wp.post(t, c, "/decide", url.Values{"csrf": {sessCSRF}, "kind": {"link"}, "id": {id}, "action": {"approve"}}); st != 200 || !strings.Contains(b, "Approved") {
		t.Fatalf("approve: %d\n%s", st, b)
	}
	if out, stderr, err := wp.psqlFrom("127.0.0.1", alice, alicePW, "", "select current_user"); err != nil || out != alice {
		t.Fatalf("retry from the approved address: %v %q %s", err, out, stderr)
	}
	// Deciding it again: not waiting any more.
	if st, _ := wp.post(t, c, "/decide", url.Values{"csrf": {sessCSRF}, "kind": {"link"}, "id": {id}, "action": {"approve"}}); st != http.StatusNotFound {
		t.Fatalf("second approval of one login: %d", st)
	}

	// 4. Another address is not admitted: it gets its own link.
	link2 := wp.refusedFrom2(t, alice, alicePW)
	if link2 == link {
		t.Fatal("two refusals carried the same link")
	}
	// Signed in as alice, her new link leads to the start page, which
	// lists that login.
	if st, _ := wp.get(t, c, link2); st != http.StatusSeeOther {
		t.Fatalf("a link while signed in: %d, want 303 to the start page", st)
	}
	_, body = wp.get(t, c, wp.base+"/")
	id2 := rowID(t, body, "127.0.0.2:")

	// 5. Another user's login: alice cannot decide it.
	wp.refused(t, "127.0.0.1", bob, bobPW)
	_, body = wp.get(t, c, wp.base+"/")
	if strings.Contains(body, "bob") {
		t.Fatalf("alice sees bob's login:\n%s", body)
	}
	bobID := strconv.Itoa(mustAtoi(t, id2) + 1) // the page numbers links in order
	if st, _ := wp.post(t, c, "/decide", url.Values{"csrf": {sessCSRF}, "kind": {"link"}, "id": {bobID}, "action": {"approve"}}); st != http.StatusNotFound {
		t.Fatalf("alice approving bob's login: %d", st)
	}
	wp.refused(t, "127.0.0.1", bob, bobPW)

	// 6. Deny the login from 127.0.0.2: its link is dead and its retry
	// is refused.
	if st, b := wp.post(t, c, "/decide", url.Values{"csrf": {sessCSRF}, "kind": {"link"}, "id": {id2}, "action": {"deny"}}); st != 200 || !strings.Contains(b, "Denied") {
		t.Fatalf("deny: %d\n%s", st, b)
	}
	if st, _ := wp.get(t, wp.newClient(t), link2); st != http.StatusGone {
		t.Fatalf("denied login's link: %d", st)
	}
	wp.refusedFrom2(t, alice, alicePW)

	// 7. An oversized body: 413, and the proxy keeps serving.
	resp, err := c.Post(wp.base+"/decide", "application/x-www-form-urlencoded", strings.NewReader("csrf="+strings.Repeat("a", 1<<20)))
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := readResp(t, resp); st != http.StatusRequestEntityTooLarge {
		t.Fatalf("oversized body: %d", st)
	}
	if out, _, err := wp.psqlFrom("127.0.0.1", svc, svcPW, "", "select 'still serving'"); err != nil || out != "still serving" {
		t.Fatalf("after the oversized body: %v %q", err, out)
	}

	// 8. Throttling: bob's wrong codes on the page count against his
	// budget (MaxFailures 3); then even his right code is refused unchecked.
	anon := wp.newClient(t)
	_, body = wp.get(t, anon, wp.base+"/")
	preB := csrfOf(t, body)
	bobWrong := "000000"
	if bobWrong == wp.code(bob) {
		bobWrong = "111111"
	}
	for i := 0; i < 3; i++ {
		if st, _ := wp.post(t, anon, "/signin", url.Values{"csrf": {preB}, "user": {bob}, "code": {bobWrong}}); st != http.StatusUnauthorized {
			t.Fatalf("bob's wrong code %d: %d", i, st)
		}
	}
	if st, b := wp.post(t, anon, "/signin", url.Values{"csrf": {preB}, "user": {bob}, "code": {wp.code(bob)}}); st != http.StatusTooManyRequests {
		t.Fatalf("bob after 3 failures: %d\n%s", st, b)
	}
	// ...and on the wire too: one budget.
	if _, stderr, err := wp.psqlFrom("127.0.0.1", bob, bobPW, wp.code(bob), "select 1"); err == nil || !strings.Contains(stderr, "too many") {
		t.Fatalf("bob on the wire after the page's failures: %v %s", err, stderr)
	}

	// 9. Expiry: a link past its TTL is gone, and so is the grant.
	link3 := wp.refusedFrom2(t, alice, alicePW)
	wp.skew.Store(int64(web.DefaultLinkTTL + time.Second))
	if st, _ := wp.get(t, wp.newClient(t), link3); st != http.StatusGone {
		t.Fatalf("expired link: %d", st)
	}
	wp.refused(t, "127.0.0.1", alice, alicePW) // the approval's window (2m) has passed too

	// The MFA invariant: no statement of a refused login reached the
	// database (log_statement=all would show 'IN').
	if strings.Contains(wp.pg.Log(), "select 'IN'") {
		t.Fatal("a refused login's query reached the database")
	}
}

func mustAtoi(t *testing.T, s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestWebApprovalWaitWebhook: --web-mode wait with --mfa-webhook. A login
// without a code waits; the webhook (whose first post hangs, then fails
// with 500) gets the event with the link after a retry while logins keep
// being decided; the link signs the user in; approving releases the
// waiting login at once; denying ends another with 28000.
func TestWebApprovalWaitWebhook(t *testing.T) {
	events := make(chan web.Event, 4)
	release := make(chan struct{})
	var calls atomic.Int32
	hookSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch calls.Add(1) {
		case 1:
			<-release // the first post hangs until the test says
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		var e web.Event
		if err := json.NewDecoder(r.Body).Decode(&e); err != nil || r.Header.Get("Content-Type") != "application/json" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		events <- e
	}))
	defer hookSrv.Close()
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	defer unblock()
	hook := web.NewWebhook(hookSrv.URL, slog.New(slog.NewTextHandler(testWriter{t}, nil)))
	hook.Backoff = []time.Duration{50 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond}
	defer hook.Close()
	wp := startWebProxy(t, web.ModeWait, hook)

	waiting := startWaitingLogin(t, wp.proxy, "waiter")
	// The webhook hangs: logins are still decided (it runs on its own goroutine).
	if out, stderr, err := wp.psqlFrom("127.0.0.1", bob, bobPW, wp.code(bob), "select 'decided'"); err != nil || out != "decided" {
		t.Fatalf("a login while the webhook hangs: %v %q %s", err, out, stderr)
	}
	if !eventually(30*time.Second, func() bool { return calls.Load() >= 1 }) {
		t.Fatal("the webhook was never called")
	}
	unblock()
	var e web.Event
	select {
	case e = <-events:
	case <-time.After(30 * time.Second):
		t.Fatal("no webhook event after the retry")
	}
	if e.Event != "login_waiting" || e.User != alice || e.Database != "app" || e.AppName != "waiter" || !strings.HasPrefix(e.ClientAddr, "127.0.0.1:") ||
		!linkRE.MatchString(e.ApprovalURL) || !e.Expires.After(time.Now()) || calls.Load() < 2 {
		t.Fatalf("event %+v after %d calls", e, calls.Load())
	}
	if !eventually(30*time.Second, func() bool { return hook.Sent() == 1 }) {
		t.Fatalf("webhook sent %d", hook.Sent())
	}

	// Approve through the link: the waiting login is released at once.
	status, body := wp.signInLink(t, wp.client, e.ApprovalURL, wp.code(alice))
	if status != 200 || !strings.Contains(body, "waiting") || !strings.Contains(body, "<td>waiter</td>") {
		t.Fatalf("home: %d\n%s", status, body)
	}
	csrf := csrfOf(t, body)
	id := rowID(t, body, "127.0.0.1:")
	if st, b := wp.post(t, wp.client, "/decide", url.Values{"csrf": {csrf}, "kind": {"wait"}, "id": {id}, "action": {"approve"}}); st != 200 || !strings.Contains(b, "Approved") {
		t.Fatalf("approve: %d\n%s", st, b)
	}
	var r loginResult
	select {
	case r = <-waiting:
	case <-time.After(30 * time.Second):
		t.Fatal("the approved login was not released")
	}
	if r.err != nil {
		t.Fatalf("approved login: %v", r.err)
	}
	var who string
	if err := r.conn.QueryRow(context.Background(), "select current_user").Scan(&who); err != nil || who != alice {
		t.Fatalf("query: %v %q", err, who)
	}
	r.conn.Close(context.Background())

	// Deny another: it ends at once with 28000.
	waiting2 := startWaitingLogin(t, wp.proxy, "denied-one")
	var id2 string
	if !eventually(30*time.Second, func() bool {
		_, body = wp.get(t, wp.client, wp.base+"/")
		if strings.Contains(body, "<td>denied-one</td>") {
			id2 = rowID(t, body, "127.0.0.1:")
			return true
		}
		return false
	}) {
		t.Fatal("the second waiting login is not on the page")
	}
	if st, b := wp.post(t, wp.client, "/decide", url.Values{"csrf": {csrf}, "kind": {"wait"}, "id": {id2}, "action": {"deny"}}); st != 200 || !strings.Contains(b, "Denied") {
		t.Fatalf("deny: %d\n%s", st, b)
	}
	select {
	case r = <-waiting2:
	case <-time.After(30 * time.Second):
		t.Fatal("the denied login did not end")
	}
	var pgErr *pgconn.PgError
	if !errors.As(r.err, &pgErr) || pgErr.Code != "28000" || !strings.Contains(pgErr.Message, "denied") {
		t.Fatalf("denied login: %v", r.err)
	}
}
