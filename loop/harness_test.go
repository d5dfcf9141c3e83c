package loop_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/loop/internal/testlog"

	"github.com/pquerna/otp/totp"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/mfa"
)

// One PostgreSQL cluster serves every test in this package: starting one
// costs seconds. log_statement=all lets tests prove what never reached it.
var sharedPG = pgtest.Shared{Options: pgcluster.Options{
	Method: pgcluster.ScramSHA256,
	Users: []pgcluster.User{
		{Name: alice, Password: alicePW, Superuser: true},
		{Name: bob, Password: bobPW, Method: pgcluster.MD5},
		{Name: svc, Password: svcPW},
		{Name: nobody, Password: nobodyPW},
	},
	Databases: []string{"app"},
	Settings:  map[string]string{"log_statement": "'all'", "max_connections": "400"},
}}

const (
	alice    = "alice" // scram-sha-256, enrolled
	alicePW  = "alice-secret"
	bob      = "bob" // md5, enrolled
	bobPW    = "bob-secret"
	svc      = "svc" // exempt service account
	svcPW    = "svc-secret"
	nobody   = "nobody" // valid password, not enrolled
	nobodyPW = "nobody-secret"
)

func TestMain(m *testing.M) {
	code := m.Run()
	sharedPG.Stop()
	if pgmfaBin != "" {
		os.RemoveAll(filepath.Dir(pgmfaBin))
	}
	os.Exit(code)
}

func cluster(t *testing.T) *pgcluster.Cluster {
	t.Helper()
	return sharedPG.Get(t)
}

// proxy is a pgmfa server under test, in this process.
type proxy struct {
	t       *testing.T
	pg      *pgcluster.Cluster
	srv     *loop.Server
	host    string
	port    int
	store   *mfa.FileStore
	secrets map[string]string
	guard   *mfa.Guard
	appr    *mfa.Approvals
	logs    *syncBuffer
}

// syncBuffer collects the proxy's log for assertions.
type syncBuffer = testlog.Buffer

// startProxy runs a proxy in front of the shared cluster. alice and bob
// are enrolled; svc is exempt; nobody is not enrolled.
func startProxy(t *testing.T, mfaOpts mfa.Options, mod func(*loop.Config)) *proxy {
	t.Helper()
	return startProxyOn(t, cluster(t), mfaOpts, mod)
}

// startProxyOn is startProxy in front of another cluster (the version
// matrix); its users are the shared cluster's.
func startProxyOn(t *testing.T, pg *pgcluster.Cluster, mfaOpts mfa.Options, mod func(*loop.Config)) *proxy {
	t.Helper()
	dir := t.TempDir()
	store, err := mfa.OpenFileStore(filepath.Join(dir, "totp.json"))
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{t: t, pg: pg, store: store, secrets: map[string]string{}, logs: &syncBuffer{}}
	for _, u := range []string{alice, bob} {
		key, err := store.Enroll(u, mfa.EnrollOptions{}, false)
		if err != nil {
			t.Fatal(err)
		}
		p.secrets[u] = key.Secret()
	}
	p.guard = mfa.NewGuard(mfaOpts, store)
	p.appr = mfa.NewApprovals(p.guard)
	port, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	p.host, p.port = "127.0.0.1", port
	cfg := loop.Config{
		Listen:           []string{net.JoinHostPort(p.host, strconv.Itoa(port))},
		Upstream:         pg.Addr(),
		Loops:            2,
		MFARequired:      true,
		MFAExempt:        map[string]bool{svc: true},
		Guard:            p.guard,
		Approvals:        p.appr,
		HandshakeTimeout: 10 * time.Second,
		MFATimeout:       10 * time.Second,
		Splice:           loop.SpliceAuto,
		Logger:           slog.New(slog.NewTextHandler(io.MultiWriter(p.logs, testWriter{t}), &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := loop.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	p.srv = srv
	done := make(chan error, 1)
	go func() { done <- srv.Run() }()
	<-srv.Ready()
	if err := srv.Err(); err != nil {
		t.Fatalf("proxy did not start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Errorf("proxy did not stop")
		}
	})
	return p
}

// testWriter sends the proxy's log to the test log (shown with -v or on
// failure).
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// code is the current TOTP code of an enrolled user.
func (p *proxy) code(user string) string {
	c, err := totp.GenerateCode(p.secrets[user], time.Now())
	if err != nil {
		p.t.Fatal(err)
	}
	return c
}

// dsn is a pgx/libpq URL to the proxy, with an MFA code option when given.
func (p *proxy) dsn(user, password, db, code string) string {
	d := pgcluster.DSN(p.host, p.port, user, password, db)
	if code != "" {
		d += "&options=" + strings.ReplaceAll(url.QueryEscape("-c pgmfa.code="+code), "+", "%20")
	}
	return d
}

// psql runs psql against the proxy and returns stdout, stderr and the error.
func (p *proxy) psql(user, password, code, sql string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1",
		"-h", p.host, "-p", strconv.Itoa(p.port), "-U", user, "-d", "app", "-c", sql)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+password, "PGSSLMODE=disable", "PGCONNECT_TIMEOUT=30")
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

// backends counts the database sessions of a user (other than ours).
func backends(t *testing.T, pg *pgcluster.Cluster, user string) int {
	t.Helper()
	out, err := pg.Psql(fmt.Sprintf("select count(*) from pg_stat_activity where usename = %s", pgcluster.QuoteLiteral(user)))
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(out)
	return n
}

// eventually polls cond for up to d.
func eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return cond()
}

func totpCode(secret string) (string, error) { return totp.GenerateCode(secret, time.Now()) }
