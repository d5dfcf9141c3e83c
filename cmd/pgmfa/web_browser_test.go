package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"image/png"
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

	"github.com/chromedp/cdproto/webauthn"
	"github.com/chromedp/chromedp"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
)

// screenshotFile is the README's picture of the approval page with a
// waiting login; TestWebBrowser regenerates it on every run.
const screenshotFile = "../../loop/web/testdata/approval-page.png"

// TestWebBrowser drives the real approval page in headless Chromium
// (Debian's chromium, through chromedp) in front of a real PostgreSQL and
// real psql: a refused login approved after a TOTP sign-in, a waiting
// login denied on the page (and the README's screenshot of it), and a
// passkey enrolled from `pgmfa enroll --webauthn`'s link with a CDP
// virtual authenticator that then signs in and approves, after which the
// enrollment link is dead and a replayed assertion is refused.
func TestWebBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL, pgmfa serve and Chromium")
	}
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		pgtest.SkipOrFail(t, "no chromium (make deps-chromium installs Debian's): %v", err)
	}
	if _, err := exec.LookPath("psql"); err != nil {
		pgtest.SkipOrFail(t, "no psql: %v", err)
	}
	bin := buildBinary(t)
	db := pgtest.Start(t, pgcluster.Options{
		Users:     []pgcluster.User{{Name: "alice", Password: fleetPW}, {Name: "bob", Password: fleetPW}},
		Databases: []string{"app"},
	})

	// The wait mode's links go to this webhook.
	events := make(chan map[string]any, 8)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var e map[string]any
		if json.NewDecoder(r.Body).Decode(&e) == nil {
			events <- e
		}
	}))
	defer hook.Close()

	// Two proxies, each with a store of its own (a TOTP step spent on one
	// does not cost the other a code). refer: bob signs in with TOTP,
	// alice with her passkey; wait: alice's waiting login is denied.
	refer := startWebProxy(t, bin, db, []string{"alice", "bob"}, "--web-mode", "refer")
	wait := startWebProxy(t, bin, db, []string{"alice"}, "--web-mode", "wait", "--mfa-webhook", hook.URL, "--mfa-timeout", "60s")
	browser := startChromium(t, chromium)

	t.Run("totp", func(t *testing.T) {
		ctx := browser.tab(t)
		link := refer.refused(t, "bob")
		code := refer.code(t, "bob")
		signInWithCode(t, ctx, link, code)
		approveRow(t, ctx, "approve", "Approved")
		if out, err := refer.psql(t, "bob", "select current_user"); err != nil || out != "bob" {
			t.Fatalf("retry after the approval: %q, %v", out, err)
		}
	})

	t.Run("deny", func(t *testing.T) {
		ctx := browser.tab(t)
		pctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		cmd := wait.psqlCmd(pctx, "alice", "select current_user")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		var link string
		select {
		case e := <-events:
			link, _ = e["approval_url"].(string)
			if e["event"] != "login_waiting" || e["user"] != "alice" || !strings.HasPrefix(link, wait.webURL+"/l/") {
				t.Fatalf("webhook event %v", e)
			}
		case err := <-exited:
			t.Fatalf("psql ended before the webhook heard of its login: %v\n%s", err, stderr.String())
		case <-time.After(30 * time.Second):
			t.Fatal("no webhook event for the waiting login")
		}
		signInWithCode(t, ctx, link, wait.code(t, "alice"))
		waitRow(t, ctx)
		select {
		case err := <-exited:
			t.Fatalf("psql ended before the decision: %v\n%s", err, stderr.String())
		default:
		}
		screenshot(t, ctx)
		approveRow(t, ctx, "deny", "Denied")
		decided := time.Now()
		select {
		case err := <-exited:
			var ee *exec.ExitError
			if !errors.As(err, &ee) || !strings.Contains(stderr.String(), "denied on the approval page") {
				t.Fatalf("psql after the denial: %v\n%s", err, stderr.String())
			}
			t.Logf("psql ended %v after the denial's page loaded: %s", time.Since(decided), strings.TrimSpace(stderr.String()))
			// psql prints no SQLSTATE for a failed connection; the proxy's
			// log line has the one it sent.
			if !eventually(5*time.Second, func() bool {
				return strings.Contains(wait.log(), `error="28000: MFA: this login of user \"alice\" was denied`)
			}) {
				t.Fatal("the proxy did not log the denial as 28000")
			}
		case <-time.After(15 * time.Second):
			t.Fatal("psql still waits 15s after the denial")
		}
	})

	t.Run("passkey", func(t *testing.T) {
		ctx := browser.tab(t)
		// A virtual platform authenticator in this tab: resident keys,
		// user verification that succeeds, presence without a touch.
		if _, err := chromedp.Call(ctx, webauthn.Enable, webauthn.EnableParams{}); err != nil {
			t.Fatal(err)
		}
		if _, err := chromedp.Call(ctx, webauthn.AddVirtualAuthenticator, webauthn.AddVirtualAuthenticatorParams{
			Options: &webauthn.VirtualAuthenticatorOptions{
				Protocol: webauthn.AuthenticatorProtocolCtap2, Transport: webauthn.AuthenticatorTransportInternal,
				HasResidentKey: true, HasUserVerification: true, IsUserVerified: true, AutomaticPresenceSimulation: true,
			},
		}); err != nil {
			t.Fatal(err)
		}

		out, err := refer.pgmfa("enroll", "--webauthn", "alice", "--web-url", refer.webURL)
		enrollURL := regexp.MustCompile(regexp.QuoteMeta(refer.webURL) + `/enroll/[A-Za-z0-9_-]+`).FindString(out)
		if err != nil || enrollURL == "" {
			t.Fatalf("pgmfa enroll --webauthn: want a link %s/enroll/TOKEN; got %v\n%s", refer.webURL, err, out)
		}
		run(t, ctx, chromedp.Navigate(enrollURL))
		run(t, ctx, chromedp.Click(chromedp.CSS("#passkey-register")))
		if status := strings.ToLower(passkeyStatus(t, ctx)); !strings.Contains(status, "registered") || strings.Contains(status, "not registered") {
			t.Fatalf("#passkey-status after registering: %q", status)
		}

		// Two refused logins before any approval (an approval admits
		// alice's next logins from here for 2 minutes): the first is
		// approved after a passkey sign-in, the second's link serves the
		// replay below.
		link := refer.refused(t, "alice")
		replayLink := refer.refused(t, "alice")
		run(t, ctx, chromedp.Navigate(link))
		run(t, ctx, chromedp.Click(chromedp.CSS("#passkey-signin")))
		approveRow(t, ctx, "approve", "Approved")
		if out, err := refer.psql(t, "alice", "select current_user"); err != nil || out != "alice" {
			t.Fatalf("retry after the passkey approval: %q, %v", out, err)
		}

		// The enrollment link was used: it opens nothing now.
		resp, err := chromedp.Run(ctx, chromedp.NavigateResponse(enrollURL))
		if err != nil {
			t.Fatal(err)
		}
		body, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("body")))
		if err != nil {
			t.Fatal(err)
		}
		if resp.Status != http.StatusGone && !strings.Contains(body, "not valid") {
			t.Fatalf("a used enrollment link answered %d:\n%s", resp.Status, body)
		}

		// A replayed assertion: signed out, on the second link's page, run
		// the ceremony by hand and send the same assertion twice.
		run(t, ctx, chromedp.Navigate(refer.webURL+"/"))
		if _, err := chromedp.RunResponse(ctx, chromedp.Click(chromedp.CSS(`form[action="/signout"] button`))); err != nil {
			t.Fatal(pageError(ctx, err))
		}
		run(t, ctx, chromedp.Navigate(replayLink), chromedp.WaitReady(chromedp.CSS(`input[name=csrf]`)))
		token, _ := json.Marshal(replayLink[strings.LastIndex(replayLink, "/")+1:])
		type answer struct {
			Status int    `json:"status"`
			Text   string `json:"text"`
		}
		answers, err := chromedp.Run(ctx, chromedp.Evaluate[[]answer](strings.Replace(replayJS, "TOKEN", string(token), 1), chromedp.EvalAwaitPromise))
		if err != nil {
			t.Fatalf("the ceremony in the page: %v", err)
		}
		if len(answers) != 2 || answers[0].Status != http.StatusOK {
			t.Fatalf("first /passkey/finish: want 200; got %+v", answers)
		}
		if a := answers[1]; a.Status < 400 || a.Status > 499 || strings.TrimSpace(a.Text) == "" {
			t.Fatalf("a replayed assertion: want a 4xx with a message; got %+v", a)
		}
		t.Logf("replayed assertion refused: %d %s", answers[1].Status, strings.TrimSpace(answers[1].Text))
	})
}

// replayJS runs one passkey sign-in by hand in the page and posts its
// assertion to /passkey/finish twice; it returns both answers. TOKEN is
// replaced by the link's token as a JSON string. The contract:
// /passkey/begin {token} → {publicKey:{challenge, allowCredentials?,
// rpId, userVerification}}, binary fields base64url; /passkey/finish takes
// the assertion with every binary field base64url. Both want the page's
// CSRF token in X-CSRF-Token.
const replayJS = `(async () => {
  // base64url <-> bytes
  const dec = s => Uint8Array.from(atob(s.replace(/-/g, '+').replace(/_/g, '/')), c => c.charCodeAt(0));
  const enc = b => btoa(String.fromCharCode(...new Uint8Array(b))).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  const csrf = document.querySelector('input[name=csrf]').value;
  const post = (path, body) => fetch(path, {method: 'POST', body: JSON.stringify(body),
    headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf}});
  const res = await post('/passkey/begin', {token: TOKEN});
  if (!res.ok) throw new Error('/passkey/begin: ' + res.status + ' ' + await res.text());
  const pk = (await res.json()).publicKey;
  const opts = {challenge: dec(pk.challenge), rpId: pk.rpId, userVerification: pk.userVerification};
  if (pk.allowCredentials) opts.allowCredentials = pk.allowCredentials.map(c => ({...c, id: dec(c.id)}));
  const cred = await navigator.credentials.get({publicKey: opts});
  const r = cred.response;
  const assertion = {id: cred.id, rawId: enc(cred.rawId), type: cred.type, response: {
    authenticatorData: enc(r.authenticatorData), clientDataJSON: enc(r.clientDataJSON),
    signature: enc(r.signature), userHandle: r.userHandle ? enc(r.userHandle) : null}};
  const out = [];
  for (let i = 0; i < 2; i++) {  // the second is the replay
    const f = await post('/passkey/finish', assertion);
    out.push({status: f.status, text: await f.text()});
  }
  return out;
})()`

// webProxy is a `pgmfa serve --web` on loopback with a JSON store.
type webProxy struct {
	bin, store string
	port       int
	webURL     string // http://localhost:PORT: WebAuthn wants a domain as RP ID
	mu         sync.Mutex
	logs       strings.Builder
}

func startWebProxy(t *testing.T, bin string, db *pgcluster.Cluster, users []string, extra ...string) *webProxy {
	t.Helper()
	p := &webProxy{bin: bin, store: filepath.Join(t.TempDir(), "totp.json")}
	for _, u := range users {
		if out, err := p.pgmfa("enroll", "--qr=false", u); err != nil {
			t.Fatalf("enroll %s: %v\n%s", u, err, out)
		}
	}
	var err error
	if p.port, err = pgcluster.FreePort(); err != nil {
		t.Fatal(err)
	}
	wport, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	p.webURL = "http://localhost:" + strconv.Itoa(wport)
	args := append([]string{"serve", "--listen", "127.0.0.1:" + strconv.Itoa(p.port), "--upstream", db.Addr(),
		"--store", p.store, "--store-key-file", "", "--admin", "", "--loops", "1",
		"--web", "127.0.0.1:" + strconv.Itoa(wport), "--web-insecure-loopback", "--web-url", p.webURL}, extra...)
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "PGMFA_STORE_KEY=")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.mu.Lock()
			p.logs.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
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
			t.Logf("pgmfa serve %v log:\n%s", extra, p.log())
		}
	})
	client := &http.Client{Timeout: 5 * time.Second}
	if !eventually(30*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(p.port), time.Second)
		if err != nil {
			return false
		}
		c.Close()
		resp, err := client.Get("http://127.0.0.1:" + strconv.Itoa(wport) + "/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}) {
		t.Fatal("pgmfa serve --web did not start")
	}
	return p
}

func (p *webProxy) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// pgmfa runs a subcommand on the proxy's store; it returns the output.
func (p *webProxy) pgmfa(args ...string) (string, error) {
	args = append(args[:1:1], append([]string{"--store", p.store, "--store-key-file", ""}, args[1:]...)...)
	cmd := exec.Command(p.bin, args...)
	cmd.Env = append(os.Environ(), "PGMFA_STORE_KEY=")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// code is user's current TOTP code, as their authenticator app shows it.
func (p *webProxy) code(t *testing.T, user string) string {
	t.Helper()
	out, err := p.pgmfa("code", user)
	if err != nil {
		t.Fatalf("pgmfa code %s: %v\n%s", user, err, out)
	}
	return strings.TrimSpace(out)
}

// psqlCmd is psql logging in as user without a code through the proxy.
func (p *webProxy) psqlCmd(ctx context.Context, user, query string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "psql", "-X", "-w", "-At", "-h", "127.0.0.1", "-p", strconv.Itoa(p.port), "-U", user, "-d", "app", "-c", query)
	// One attempt per run (no SSL or GSS retry), and no password prompt.
	cmd.Env = append(os.Environ(), "PGPASSWORD="+fleetPW, "PGSSLMODE=disable", "PGGSSENCMODE=disable", "PGAPPNAME=pgmfa-browser-test")
	return cmd
}

// psql runs query as user and returns its output, or stderr in the error.
func (p *webProxy) psql(t *testing.T, user, query string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := p.psqlCmd(ctx, user, query)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", errors.New(err.Error() + ": " + stderr.String())
	}
	return strings.TrimSpace(stdout.String()), nil
}

// refused logs in as user without a code (refer mode) and returns the
// link of the refusal's HINT, as psql prints it.
func (p *webProxy) refused(t *testing.T, user string) string {
	t.Helper()
	out, err := p.psql(t, user, "select 1")
	if err == nil {
		t.Fatalf("a login of %s without a code got in: %q", user, out)
	}
	msg := err.Error()
	// psql prints no SQLSTATE for a failed connection; the proxy's log
	// line has the one it sent.
	if !eventually(5*time.Second, func() bool {
		return strings.Contains(p.log(), `error="28000: MFA approval needed for user \"`+user+`\"`)
	}) {
		t.Fatalf("the proxy did not log the refusal of %s as 28000:\n%s", user, p.log())
	}
	link := regexp.MustCompile(`HINT:  open (` + regexp.QuoteMeta(p.webURL) + `/l/[A-Za-z0-9_-]{43}) `).FindStringSubmatch(msg)
	if link == nil || !strings.Contains(msg, "FATAL:  MFA approval needed") {
		t.Fatalf("want a refusal with a link to %s in the HINT; psql said %s", p.webURL, msg)
	}
	return link[1]
}

// chromiumBrowser is one headless Chromium for the whole test; each
// subtest gets a tab in a browser context of its own (its own cookies).
type chromiumBrowser struct {
	ctx context.Context
}

func startChromium(t *testing.T, path string) *chromiumBrowser {
	t.Helper()
	dataDir := t.TempDir() // removed after the browser stops (cleanups run last first)
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.UserDataDir(dataDir),
		chromedp.NoSandbox, // as root Chromium refuses to start with its sandbox
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.WindowSize(1100, 700),
	)
	actx, acancel := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() {
		cancel()
		acancel()
		// No Chromium process of this test outlives it.
		if !eventually(10*time.Second, func() bool { return len(processesWith(dataDir)) == 0 }) {
			t.Errorf("Chromium processes left running: %v", processesWith(dataDir))
		}
	})
	// The first Do starts the browser, which lives as long as the context
	// of that Do: not one with a deadline.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start %s: %v", path, err)
	}
	return &chromiumBrowser{ctx: ctx}
}

// tab opens a tab in a fresh browser context, closed when t ends; its
// context carries a deadline for everything the subtest does in it.
func (b *chromiumBrowser) tab(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := chromedp.NewContext(b.ctx, chromedp.WithNewBrowserContext())
	ctx, tcancel := context.WithTimeout(ctx, 60*time.Second)
	t.Cleanup(func() { tcancel(); cancel() })
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("open a tab: %v", err)
	}
	return ctx
}

// processesWith lists the PIDs whose command line mentions s.
func processesWith(s string) []int {
	var pids []int
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		if b, err := os.ReadFile("/proc/" + d.Name() + "/cmdline"); err == nil && bytes.Contains(b, []byte(s)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func run(t *testing.T, ctx context.Context, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(ctx, steps...); err != nil {
		t.Fatal(pageError(ctx, err))
	}
}

// pageError adds the page's URL and text to err, for a failure's message.
func pageError(ctx context.Context, err error) error {
	c, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	loc, _ := chromedp.Run(c, chromedp.Location())
	text, _ := chromedp.Run(c, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`))
	return errors.New(err.Error() + "\npage " + loc + ":\n" + text)
}

// signInWithCode opens link and signs in with a TOTP code.
func signInWithCode(t *testing.T, ctx context.Context, link, code string) {
	t.Helper()
	run(t, ctx,
		chromedp.Navigate(link),
		chromedp.SendKeys(chromedp.CSS(`input[name=code]`), code),
		chromedp.Click(chromedp.CSS(`form[action="/signin"] button[type=submit]`)),
	)
}

// waitRow waits until the signed-in page lists a login to decide.
func waitRow(t *testing.T, ctx context.Context) {
	t.Helper()
	run(t, ctx, chromedp.WaitVisible(chromedp.CSS(`button[name=action][value=approve]`)))
}

// approveRow clicks action (approve or deny) on the page's first login and
// checks that the page it leads to says want.
func approveRow(t *testing.T, ctx context.Context, action, want string) {
	t.Helper()
	waitRow(t, ctx)
	resp, err := chromedp.RunResponse(ctx, chromedp.Click(chromedp.CSS(`button[name=action][value=`+action+`]`)))
	if err != nil {
		t.Fatal(pageError(ctx, err))
	}
	status, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(`[role=status]`)))
	if err != nil || resp.Status != http.StatusOK || !strings.Contains(status, want) {
		t.Fatal(pageError(ctx, fmt.Errorf("%s: want %q; got %d %q, %v", action, want, resp.Status, status, err)))
	}
}

// passkeyStatus waits until #passkey-status says how the registration
// ended and returns what it says.
func passkeyStatus(t *testing.T, ctx context.Context) string {
	t.Helper()
	status, err := chromedp.Run(ctx, chromedp.Poll[string](`(() => {
  const s = document.querySelector('#passkey-status')?.textContent ?? '';
  return /registered|error|fail|not/i.test(s) ? s : null;
})()`, chromedp.WithPollingInterval(50*time.Millisecond)))
	if err != nil {
		t.Fatal(pageError(ctx, errors.New("#passkey-status: "+err.Error())))
	}
	return status
}

// screenshot writes the page, signed in with a login waiting, to
// screenshotFile for the README.
func screenshot(t *testing.T, ctx context.Context) {
	t.Helper()
	b, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("the screenshot is no PNG: %v", err)
	}
	if sz := img.Bounds().Size(); sz.X < 400 || sz.Y < 300 || len(b) < 10<<10 {
		t.Fatalf("the screenshot is too small to show anything: %v, %d bytes", sz, len(b))
	}
	if err := os.WriteFile(screenshotFile, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(readmeSection(t, "## Approving from a web page"), strings.TrimPrefix(screenshotFile, "../../")) {
		t.Errorf("README's section on the approval page does not show %s", screenshotFile)
	}
}
