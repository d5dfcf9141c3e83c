package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/loop/tlsproxy/testpki"
)

// metricsProxy is one `pgmfa serve --metrics` in front of a real
// PostgreSQL, with a file store.
type metricsProxy struct {
	t       *testing.T
	bin     string
	db      *pgcluster.Cluster
	store   string
	admin   string
	port    int
	metrics string // host:port of --metrics
	mu      sync.Mutex
	logs    strings.Builder
}

func (p *metricsProxy) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// pgmfa runs a subcommand of the binary with the environment's store
// settings cleared and returns its combined output.
func (p *metricsProxy) pgmfa(stdin string, args ...string) (string, error) {
	cmd := exec.Command(p.bin, args...)
	cmd.Env = append(os.Environ(), "PGMFA_STORE=", "PGMFA_STORE_KEY_FILE=", "PGMFA_STORE_KEY=", "PGMFA_ADMIN=")
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (p *metricsProxy) code(user string) string {
	p.t.Helper()
	out, err := p.pgmfa("", "code", "--store", p.store, "--store-key-file", "", user)
	if err != nil {
		p.t.Fatalf("pgmfa code: %v\n%s", err, out)
	}
	return strings.TrimSpace(out)
}

// startMetricsProxy starts PostgreSQL with alice and bob (enrolled) and
// svc (exempt), and pgmfa serve with --metrics on a free loopback port.
func startMetricsProxy(t *testing.T) *metricsProxy {
	t.Helper()
	p := &metricsProxy{t: t, bin: buildBinary(t)}
	p.db = pgtest.Start(t, pgcluster.Options{
		Users:     []pgcluster.User{{Name: "alice", Password: fleetPW}, {Name: "bob", Password: fleetPW}, {Name: "svc", Password: fleetPW}},
		Databases: []string{"app"},
	})
	dir := t.TempDir()
	p.store = filepath.Join(dir, "totp.json")
	p.admin = filepath.Join(dir, "admin.sock")
	for _, u := range []string{"alice", "bob"} {
		if out, err := p.pgmfa("", "enroll", "--store", p.store, "--store-key-file", "", "--qr=false", u); err != nil {
			t.Fatalf("enroll %s: %v\n%s", u, err, out)
		}
	}
	var err error
	if p.port, err = pgcluster.FreePort(); err != nil {
		t.Fatal(err)
	}
	mport, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	p.metrics = "127.0.0.1:" + strconv.Itoa(mport)
	pki, err := testpki.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pki.Close() })
	// Clients choose: plaintext ones are spliced, TLS ones relayed by the
	// TLS driver.
	cmd := exec.Command(p.bin, "serve", "--listen", "127.0.0.1:"+strconv.Itoa(p.port), "--upstream", p.db.Addr(),
		"--store", p.store, "--store-key-file", "", "--admin", p.admin, "--loops", "1",
		"--mfa-exempt", "svc", "--mfa-max-failures", "1", "--mfa-timeout", "60s", "--metrics", p.metrics,
		"--tls-cert", pki.CertFile, "--tls-key", pki.KeyFile)
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
			t.Logf("pgmfa serve log:\n%s", p.log())
		}
	})
	if !eventually(30*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(p.port), time.Second)
		if err == nil {
			c.Close()
		}
		_, merr := http.Get("http://" + p.metrics + "/metrics")
		return err == nil && merr == nil
	}) {
		t.Fatalf("pgmfa serve did not start:\n%s", p.log())
	}
	return p
}

// scrape fetches /metrics: the raw text, and every sample by its series
// as the text names it (`name{label="v",...}`).
func scrape(t *testing.T, addr string) (string, map[string]float64) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %d %v\n%s", resp.StatusCode, err, body)
	}
	samples := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("scrape line %q: %v", line, err)
		}
		samples[line[:i]] = v
	}
	return string(body), samples
}

func (p *metricsProxy) login(ctx context.Context, user, code string) (*pgx.Conn, error) {
	return p.loginTLS(ctx, user, code, false)
}

func (p *metricsProxy) loginTLS(ctx context.Context, user, code string, tls bool) (*pgx.Conn, error) {
	dsn := pgcluster.DSN("127.0.0.1", p.port, user, fleetPW, "app")
	if tls {
		dsn = strings.Replace(dsn, "sslmode=disable", "sslmode=require", 1)
	}
	if code != "" {
		dsn += "&options=" + strings.ReplaceAll(url.QueryEscape("-c pgmfa.code="+code), "+", "%20")
	}
	return pgx.Connect(ctx, dsn)
}

// TestMetrics runs pgmfa serve --metrics against a real PostgreSQL: logins
// of every kind and a session moving data, then a scrape whose counters
// moved by exactly what was done, which promtool accepts, and which a real
// Prometheus server scrapes and answers queries about.
func TestMetrics(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL and pgmfa serve")
	}
	p := startMetricsProxy(t)
	spliced := strings.Contains(p.log(), "kernel splicing enabled (sockmap)")
	mode := "sockmap"
	if !spliced {
		if pgtest.InCI() {
			t.Fatalf("CI: kernel splicing must be available here; log:\n%s", p.log())
		}
		t.Log("kernel splicing unavailable here (not root, or no BPF): the sessions are relayed, and counted as such")
		mode = "relay"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// An exempt login, a session of one query.
	c, err := p.login(ctx, "svc", "")
	if err != nil {
		t.Fatalf("exempt login: %v", err)
	}
	if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)

	// The same over TLS: a session of the TLS driver.
	c, err = p.loginTLS(ctx, "svc", "", true)
	if err != nil {
		t.Fatalf("exempt login over TLS: %v", err)
	}
	if _, ok := c.PgConn().Conn().(*tls.Conn); !ok {
		t.Fatal("the TLS login is not over TLS")
	}
	if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if _, m := scrape(t, p.metrics); m[`pgmfa_sessions_open{mode="tls"}`] != 1 {
		t.Errorf("TLS sessions open during the session: %v, want 1", m[`pgmfa_sessions_open{mode="tls"}`])
	}
	c.Close(ctx)

	// A login with a code, and a session that moves a known amount of
	// data each way, open during a scrape.
	code := p.code("alice")
	c, err = p.login(ctx, "alice", code)
	if err != nil {
		t.Fatalf("login with a code: %v", err)
	}
	const up, down = 300_000, 2_000_000
	var n int
	if err := c.QueryRow(ctx, "SELECT length($1::text)", strings.Repeat("u", up)).Scan(&n); err != nil || n != up {
		t.Fatalf("upload: %d %v", n, err)
	}
	var s string
	if err := c.QueryRow(ctx, "SELECT repeat('d', $1)", down).Scan(&s); err != nil || len(s) != down {
		t.Fatalf("download: %d %v", len(s), err)
	}
	_, m := scrape(t, p.metrics)
	if got := m[`pgmfa_sessions_open{mode="`+mode+`"}`]; got != 1 {
		t.Errorf("sessions open (%s) during the session: %v, want 1", mode, got)
	}
	c.Close(ctx)

	// A wrong code (refused, and the user's budget of 1 spent), then the
	// right code refused unchecked: throttled.
	bad := "000000"
	if bad == p.code("alice") {
		bad = "111111"
	}
	for i, cd := range []string{bad, p.code("alice")} {
		if c, err := p.login(ctx, "alice", cd); err == nil {
			c.Close(ctx)
			t.Fatalf("refused login %d was admitted", i)
		}
	}

	// A login without a code, released by pgmfa approve.
	errc := make(chan error, 1)
	go func() {
		c, err := p.login(ctx, "bob", "")
		if err == nil {
			_, err = c.Exec(ctx, "SELECT 1")
			c.Close(ctx)
		}
		errc <- err
	}()
	if !eventually(30*time.Second, func() bool { return strings.Contains(p.log(), "login waiting for MFA approval") }) {
		t.Fatal("bob's login did not wait for approval")
	}
	if out, err := p.pgmfa(p.code("bob")+"\n", "approve", "--admin", p.admin, "bob"); err != nil {
		t.Fatalf("pgmfa approve: %v\n%s", err, out)
	}
	if err := <-errc; err != nil {
		t.Fatalf("approved login: %v", err)
	}

	// Sessions are counted when they end, which the proxy learns from the
	// kernel a moment after the client closes.
	var text string
	if !eventually(30*time.Second, func() bool {
		text, m = scrape(t, p.metrics)
		return m[`pgmfa_sessions_ended_total{mode="`+mode+`"}`] == 3 && m[`pgmfa_sessions_ended_total{mode="tls"}`] == 1
	}) {
		t.Fatalf("sessions ended: %v, want 3\n%s", m[`pgmfa_sessions_ended_total{mode="`+mode+`"}`], text)
	}
	want := map[string]float64{
		`pgmfa_logins_total{mfa="exempt",result="ok"}`:             2,
		`pgmfa_logins_total{mfa="code",result="ok"}`:               1,
		`pgmfa_logins_total{mfa="approval",result="ok"}`:           1,
		`pgmfa_logins_total{mfa="code",result="refused"}`:          2,
		`pgmfa_logins_total{mfa="remembered",result="ok"}`:         0,
		`pgmfa_logins_total{mfa="none",result="refused"}`:          0,
		`pgmfa_mfa_refusals_total{reason="bad_code"}`:              1,
		`pgmfa_mfa_refusals_total{reason="throttled"}`:             1,
		`pgmfa_mfa_refusals_total{reason="replayed"}`:              0,
		`pgmfa_login_duration_seconds_count{result="ok"}`:          4,
		`pgmfa_login_duration_seconds_count{result="refused"}`:     2,
		`pgmfa_mfa_approval_wait_seconds_count{result="approved"}`: 1,
		`pgmfa_mfa_approval_wait_seconds_count{result="timeout"}`:  0,
		`pgmfa_sessions_open{mode="` + mode + `"}`:                 0,
		`pgmfa_sessions_open{mode="tls"}`:                          0,
		`pgmfa_store_call_duration_seconds_count{op="claim_step"}`: 2, // alice's code, bob's approval
		`pgmfa_store_errors_total{op="claim_step"}`:                0,
		`pgmfa_splice_fallbacks_total{reason="other"}`:             0,
		`pgmfa_splice_fallbacks_total{reason="peer_closed"}`:       0,
		`pgmfa_splice_fallbacks_total{reason="unix_upstream"}`:     0,
		`pgmfa_splice_fallbacks_total{reason="shutdown"}`:          0,
	}
	if spliced {
		want[`pgmfa_sessions_ended_total{mode="relay"}`] = 0
		want[`pgmfa_splice_backlog_limit_ends_total`] = 0
		want[`pgmfa_splice_anomalies_total`] = 0
		want[`pgmfa_splice_flow_control_episodes_total`] = 0
	}
	// Five plaintext logins asked for a database connection (the TLS one
	// dials its own): the first found no spare; each that succeeded opened the next.
	used, missed := m[`pgmfa_spare_conn_requests_total{result="used"}`], m[`pgmfa_spare_conn_requests_total{result="missed"}`]
	if used+missed != 5 || missed < 1 {
		t.Errorf("spare connections: used %v, missed %v; want 5 requests, the first one missed", used, missed)
	}
	want[`pgmfa_spare_conns_discarded_total{reason="dead"}`] = 0
	want[`pgmfa_spare_conn_dial_errors_total`] = 0
	for k, v := range want {
		got, ok := m[k]
		if !ok || got != v {
			t.Errorf("%s = %v (present %v), want %v", k, got, ok, v)
		}
	}
	// The bytes: the data each way plus the protocol around it (a few
	// hundred bytes per session), and no more.
	c2s := m[`pgmfa_session_bytes_total{direction="client_to_server",mode="`+mode+`"}`]
	s2c := m[`pgmfa_session_bytes_total{direction="server_to_client",mode="`+mode+`"}`]
	if c2s < up || c2s > up+16<<10 || s2c < down || s2c > down+16<<10 {
		t.Errorf("session bytes: %v to the server, %v to the client; want %d and %d plus a little protocol", c2s, s2c, up, down)
	}
	if tb := m[`pgmfa_session_bytes_total{direction="server_to_client",mode="tls"}`]; tb <= 0 || tb > 16<<10 {
		t.Errorf("TLS session bytes to the client: %v, want a little protocol", tb)
	}
	for _, k := range []string{"go_goroutines", "process_resident_memory_bytes", "pgmfa_login_duration_seconds_sum{result=\"ok\"}"} {
		if m[k] <= 0 {
			t.Errorf("%s = %v, want > 0", k, m[k])
		}
	}
	build := false
	for k, v := range m {
		if strings.HasPrefix(k, "pgmfa_build_info{") && v == 1 && strings.Contains(k, `goversion="go`) {
			build = true
		}
		// No label may carry a user name or a code.
		if strings.HasPrefix(k, "pgmfa_") && (strings.Contains(k, "alice") || strings.Contains(k, "bob") ||
			strings.Contains(k, "svc") || strings.Contains(k, code)) {
			t.Errorf("a series names a user or a code: %s", k)
		}
	}
	if !build {
		t.Error("no pgmfa_build_info series")
	}

	t.Run("promtool", func(t *testing.T) {
		promtool, err := exec.LookPath("promtool")
		if err != nil {
			pgtest.SkipOrFail(t, "promtool is not installed (Debian package prometheus; make deps-prometheus)")
		}
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = strings.NewReader(text)
		if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) != 0 {
			t.Fatalf("promtool check metrics: %v\n%s", err, out)
		}
	})

	t.Run("wrong path", func(t *testing.T) {
		resp, err := http.Get("http://" + p.metrics + "/metric")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "/metrics") {
			t.Fatalf("GET /metric: %d %q", resp.StatusCode, body)
		}
	})

	t.Run("prometheus", func(t *testing.T) {
		queryThroughPrometheus(t, p.metrics, `pgmfa_logins_total{result="ok",mfa="exempt"}`, 2)
	})
}

// queryThroughPrometheus starts a real Prometheus server (loopback, 1 s
// scrape interval, storage in a temp dir) scraping target, and waits until
// its HTTP API answers query with want.
func queryThroughPrometheus(t *testing.T, target, query string, want float64) {
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		pgtest.SkipOrFail(t, "prometheus is not installed (Debian package prometheus; make deps-prometheus)")
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: pgmfa
    static_configs:
      - targets: [%q]
`, target)), 0o600); err != nil {
		t.Fatal(err)
	}
	port, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	web := "127.0.0.1:" + strconv.Itoa(port)
	var logs bytes.Buffer
	var mu sync.Mutex
	cmd := exec.Command(bin, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+web, "--log.level=warn")
	cmd.Stdout = &lockedWriter{&mu, &logs}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	var last string
	ok := eventually(60*time.Second, func() bool {
		resp, err := http.Get("http://" + web + "/api/v1/query?query=" + url.QueryEscape(query))
		if err != nil {
			last = err.Error()
			return false
		}
		defer resp.Body.Close()
		var r struct {
			Status string
			Data   struct {
				Result []struct {
					Metric map[string]string
					Value  [2]any
				}
			}
		}
		body, _ := io.ReadAll(resp.Body)
		last = string(body)
		if json.Unmarshal(body, &r) != nil || r.Status != "success" || len(r.Data.Result) != 1 {
			return false
		}
		res := r.Data.Result[0]
		v, _ := res.Value[1].(string)
		return res.Metric["job"] == "pgmfa" && res.Metric["instance"] == target && v == strconv.FormatFloat(want, 'f', -1, 64)
	})
	if !ok {
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("Prometheus did not answer %s = %v; last answer: %s\nprometheus log:\n%s", query, want, last, logs.String())
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// TestMetricsAddressRefused: --metrics on anything but loopback or a unix
// socket stops pgmfa serve at start, with the reason, before it serves.
func TestMetricsAddressRefused(t *testing.T) {
	bin := buildBinary(t)
	store := filepath.Join(t.TempDir(), "totp.json")
	for addr, want := range map[string]string{
		"0.0.0.0:9187":   "is not a loopback address",
		"192.0.2.1:9187": "is not a loopback address",
		":9187":          "listens on every interface",
		"[::]:9187":      "is not a loopback address",
		"9187":           "want a loopback host:port",
	} {
		cmd := exec.Command(bin, "serve", "--listen", "127.0.0.1:0", "--store", store, "--store-key-file", "",
			"--admin", "", "--splice", "off", "--metrics", addr)
		cmd.Env = append(os.Environ(), "PGMFA_STORE_KEY=")
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), want) ||
			strings.Contains(string(out), "pgmfa listening") {
			t.Errorf("--metrics %s: %v, want exit 1 saying %q before listening:\n%s", addr, err, want, out)
		}
	}
}
