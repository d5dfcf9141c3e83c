package loop_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/pquerna/otp/totp"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/loop/tlsproxy/testpki"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

// The version matrix: every login path of the README's support table
// against every supported PostgreSQL major version. 15 is the
// distribution's server; the others are the builds `make deps-pg-servers`
// installs (bench/pgcluster/install-servers.sh). The table in README
// ("Supported PostgreSQL versions") lists exactly these cells.
var matrixVersions = []int{13, 14, 15, 16, 17, 18}

// Matrix users beyond the harness's alice (scram-sha-256) and bob (md5).
const (
	carol   = "carol" // pg_hba password (cleartext)
	carolPW = "carol-secret"
	dave    = "dave" // pg_hba trust
)

// TestMatrix starts one cluster per version (two at a time: the versions
// are parallel subtests) and runs each cell as a subtest of its version.
// A version has five proxies (passthrough, --auth password, TLS to the
// database with each sslnegotiation, TLS from the client): loading the BPF
// program makes a proxy cost a second or two to start, so cells share them. Codes are
// single use per time step, so the proxies run on a clock that moves one
// step forward for every code a cell asks for.
func TestMatrix(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL of every version; skipped with -short")
	}
	pki := testPKI(t)
	certs, err := tlsproxy.LoadCerts(pki.CertFile, pki.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	splice := loop.SpliceOff
	if modes := spliceModes(t); modes[len(modes)-1] == loop.SpliceSockmap {
		splice = loop.SpliceSockmap
	}
	for _, v := range matrixVersions {
		t.Run(fmt.Sprintf("pg%d", v), func(t *testing.T) {
			t.Parallel()
			pg := pgtest.Start(t, pgcluster.Options{
				Version: v,
				Method:  pgcluster.ScramSHA256,
				Users: []pgcluster.User{
					{Name: alice, Password: alicePW, Superuser: true},
					{Name: bob, Password: bobPW, Method: pgcluster.MD5},
					{Name: carol, Password: carolPW, Method: pgcluster.Password},
					{Name: dave, Method: pgcluster.Trust},
				},
				Databases: []string{"app"},
				SSL:       &pgcluster.SSLFiles{CertFile: pki.CertFile, KeyFile: pki.KeyFile},
			})
			if pg.Version != v {
				t.Fatalf("asked for PostgreSQL %d, %s runs %d", v, pg.BinDir, pg.Version)
			}
			m := &matrix{pg: pg, version: v, pki: pki, certs: certs, splice: splice, clock: &stepClock{now: time.Now()}}
			m.run(t)
		})
	}
}

type matrix struct {
	pg      *pgcluster.Cluster
	version int
	pki     *testpki.PKI
	certs   *tlsproxy.Certs
	splice  string
	clock   *stepClock
}

// stepClock is the proxies' clock: it stands still except when a code is
// taken, which moves it one TOTP step on.
type stepClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *stepClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *stepClock) step() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(30 * time.Second)
	return c.now
}

// code is user's code at the next step of the clock.
func (m *matrix) code(p *proxy, user string) string {
	c, err := totp.GenerateCode(p.secrets[user], m.clock.step())
	if err != nil {
		p.t.Fatal(err)
	}
	return c
}

// proxy starts a proxy in front of this version's cluster with every
// matrix user enrolled (alice and bob by the harness, carol and dave here).
func (m *matrix) proxy(t *testing.T, remember time.Duration, mod func(*loop.Config)) *proxy {
	t.Helper()
	p := startProxyOn(t, m.pg, mfa.Options{Now: m.clock.Now, Remember: remember}, func(c *loop.Config) {
		c.Splice = m.splice
		if mod != nil {
			mod(c)
		}
	})
	for _, u := range []string{carol, dave} {
		key, err := p.store.Enroll(u, mfa.EnrollOptions{}, false)
		if err != nil {
			t.Fatal(err)
		}
		p.secrets[u] = key.Secret()
	}
	return p
}

func (m *matrix) run(t *testing.T) {
	cell := func(name string, f func(t *testing.T)) { t.Run(name, f) }
	// main keeps a spare database connection, as pgmfa serve does by
	// default: its logins after the first run on backends forked ahead.
	main := m.proxy(t, 0, func(c *loop.Config) { c.Spares = 1 })
	// Remember: pgbench opens a connection of its own before its clients,
	// with the same password and code.
	authPassword := m.proxy(t, time.Minute, func(c *loop.Config) {
		c.Auth = session.AuthPassword
		c.AllowCleartextPassword = true
	})
	upTLS := m.proxy(t, 0, func(c *loop.Config) {
		c.UpstreamTLS = tlsproxy.UpstreamTLS{SSLMode: tlsproxy.SSLRequire}
	})
	upDirect := m.proxy(t, 0, func(c *loop.Config) {
		c.UpstreamTLS = tlsproxy.UpstreamTLS{SSLMode: tlsproxy.SSLRequire, SSLNegotiation: tlsproxy.NegotiateDirect}
	})
	clientTLS := m.proxy(t, 0, func(c *loop.Config) {
		c.TLSCerts, c.TLSMode = m.certs, session.TLSRequire
	})

	// Passthrough: the database checks the password, one cell per pg_hba
	// method, psql and pgx alternating.
	cell("passthrough/scram-sha-256/psql", func(t *testing.T) {
		p := main
		m.psqlLogin(t, p, alice, alicePW, m.code(p, alice), nil)
		m.expectLogin(t, p, alice, "scram-sha-256", "code")
	})
	cell("passthrough/md5/pgx", func(t *testing.T) {
		p := main
		m.pgxLogin(t, p, p.dsn(bob, bobPW, "app", m.code(p, bob)), bob)
		m.expectLogin(t, p, bob, "md5", "code")
	})
	cell("passthrough/password/psql", func(t *testing.T) {
		p := main
		m.psqlLogin(t, p, carol, carolPW, m.code(p, carol), nil)
		m.expectLogin(t, p, carol, "password", "code")
	})
	cell("passthrough/trust/pgx", func(t *testing.T) {
		p := main
		m.pgxLogin(t, p, p.dsn(dave, "", "app", m.code(p, dave)), dave)
		m.expectLogin(t, p, dave, "trust", "code")
	})
	cell("spare/pgx", func(t *testing.T) {
		p := main
		if !eventually(20*time.Second, func() bool { return p.srv.StatsSnapshot()["spares_held"] == 1 }) {
			t.Fatalf("no spare after the logins above: %v", p.srv.StatsSnapshot())
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		conn := connectOnSpare(ctx, t, p, p.dsn(dave, "", "app", m.code(p, dave)))
		defer conn.Close(ctx)
		m.checkSession(t, conn, dave)
	})
	cell("passthrough/wrong-code/psql", func(t *testing.T) {
		p := main
		_, stderr, err := p.psql(alice, alicePW, wrongCode(m.code(p, alice)), "select 1")
		if err == nil || !strings.Contains(stderr, "pgmfa") {
			t.Fatalf("a wrong code logged in or was refused without a word: %v\n%s", err, stderr)
		}
	})

	// --auth password: the proxy logs in upstream itself with the password
	// the client sent, the code split off its end.
	cell("auth-password/scram-sha-256/password-suffix/psql", func(t *testing.T) {
		p := authPassword
		m.psqlLogin(t, p, alice, alicePW+m.code(p, alice), "", nil)
		m.expectLogin(t, p, alice, "", "password")
	})
	cell("auth-password/md5/password-suffix/pgx", func(t *testing.T) {
		p := authPassword
		m.pgxLogin(t, p, p.dsn(bob, bobPW+m.code(p, bob), "app", ""), bob)
		m.expectLogin(t, p, bob, "", "password")
	})

	// MFA out of band: the login waits until approved.
	cell("passthrough/approval/pgx", func(t *testing.T) {
		p := main
		ch := startWaitingLogin(t, p, "matrix")
		if !eventually(20*time.Second, func() bool { return len(p.appr.List()) == 1 }) {
			t.Fatal("the login never started waiting")
		}
		if r := p.appr.Approve(mfa.Approval{User: alice, Code: m.code(p, alice)}); !r.Outcome.OK {
			t.Fatalf("approve: %+v", r)
		}
		r := <-ch
		if r.err != nil {
			t.Fatalf("approved login: %v", r.err)
		}
		defer r.conn.Close(context.Background())
		m.checkSession(t, r.conn, alice)
	})

	// A cancel through the proxy reaches the database with its own key.
	cell("cancel/pgx", func(t *testing.T) {
		p := main
		m.cancelPgx(t, p, p.dsn(alice, alicePW, "app", m.code(p, alice)))
	})

	// COPY both ways through a spliced session, compared byte for byte
	// with the same COPY on a direct connection.
	cell("copy/"+m.splice+"/pgx", func(t *testing.T) { m.copyCell(t, main) })

	// The database side over TLS.
	cell("upstream-tls/require/psql", func(t *testing.T) {
		p := upTLS
		out := m.psqlLogin(t, p, alice, alicePW, m.code(p, alice), []string{"select ssl from pg_stat_ssl where pid = pg_backend_pid()"})
		if out != "t" {
			t.Fatalf("the database session is not encrypted: %q", out)
		}
	})
	cell("upstream-tls/require/md5/pgx", func(t *testing.T) {
		p := upTLS
		m.pgxLogin(t, p, p.dsn(bob, bobPW, "app", m.code(p, bob)), bob)
	})

	// Direct TLS to the database (--upstream-sslnegotiation direct): 17
	// and later take it; older servers fail the login with a message that
	// says what to change.
	cell("upstream-tls/direct/psql", func(t *testing.T) {
		p := upDirect
		if m.version >= 17 {
			out := m.psqlLogin(t, p, alice, alicePW, m.code(p, alice), []string{"select ssl from pg_stat_ssl where pid = pg_backend_pid()"})
			if out != "t" {
				t.Fatalf("the database session is not encrypted: %q", out)
			}
			return
		}
		_, stderr, err := p.psql(alice, alicePW, m.code(p, alice), "select 1")
		if err == nil || !strings.Contains(stderr, "PostgreSQL 17") {
			t.Fatalf("direct TLS to PostgreSQL %d: want a refusal naming PostgreSQL 17, got %v\n%s", m.version, err, stderr)
		}
	})

	// The client side over direct TLS (PostgreSQL 17's sslnegotiation=direct,
	// ALPN "postgresql"), with MFA.
	cell("client-tls/direct/pgx", func(t *testing.T) {
		p := clientTLS
		dsn := fmt.Sprintf("postgres://%s:%s@localhost:%d/app?sslmode=verify-full&sslnegotiation=direct&sslrootcert=%s",
			bob, bobPW, p.port, m.pki.CAFile)
		cfg, err := pgx.ParseConfig(dsn)
		if err != nil {
			t.Fatal(err)
		}
		cfg.RuntimeParams["options"] = "-c pgmfa.code=" + m.code(p, bob)
		conn, err := pgx.ConnectConfig(context.Background(), cfg)
		if err != nil {
			t.Fatalf("pgx sslnegotiation=direct: %v", err)
		}
		defer conn.Close(context.Background())
		m.checkSession(t, conn, bob)
		if _, ok := conn.PgConn().Conn().(*tls.Conn); !ok {
			t.Fatalf("pgx is not on TLS: %T", conn.PgConn().Conn())
		}
	})

	cell("auth-password/remember/pgbench", func(t *testing.T) { m.pgbenchCell(t, authPassword) })

	// Protocol 3.2 (README: "Protocol versions").
	cell("protocol-3.2/pgx/cancel", func(t *testing.T) {
		p := main
		key := m.cancelPgx(t, p, p.dsn(alice, alicePW, "app", m.code(p, alice))+"&max_protocol_version=3.2")
		// PostgreSQL 18 speaks 3.2 and sends a 32-byte secret; older
		// servers negotiate 3.0 down and keep the 4-byte key.
		if want := m.keyLen(); len(key) != want {
			t.Fatalf("secret key of %d bytes, want %d (the database's own)", len(key), want)
		}
	})
	cell("protocol-3.2/auth-password/pgx", func(t *testing.T) {
		// pgmfa answers the password itself and then logs in at 3.2; the
		// database's NegotiateProtocolVersion (13-17) is held and sent
		// ahead of AuthenticationOk.
		p := authPassword
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		conn, err := pgx.Connect(ctx, p.dsn(carol, carolPW+m.code(p, carol), "app", "")+"&max_protocol_version=3.2")
		if err != nil {
			t.Fatalf("3.2 login with --auth password: %v", err)
		}
		defer conn.Close(ctx)
		m.checkSession(t, conn, carol)
		if got := len(conn.PgConn().SecretKey()); got != m.keyLen() {
			t.Fatalf("secret key of %d bytes, want %d", got, m.keyLen())
		}
	})
	cell("protocol-3.2/client-tls/direct/pgx/cancel", func(t *testing.T) {
		// The TLS driver's path: pgx over direct TLS asks for 3.2, and
		// its cancel (sent inside TLS, long key under 18) cancels.
		p := clientTLS
		dsn := fmt.Sprintf("postgres://%s:%s@localhost:%d/app?sslmode=verify-full&sslnegotiation=direct&sslrootcert=%s&max_protocol_version=3.2&options=%s",
			alice, alicePW, p.port, m.pki.CAFile, strings.ReplaceAll(url.QueryEscape("-c pgmfa.code="+m.code(p, alice)), "+", "%20"))
		if key := m.cancelPgx(t, p, dsn); len(key) != m.keyLen() {
			t.Fatalf("secret key of %d bytes, want %d", len(key), m.keyLen())
		}
	})
	cell("protocol-3.2/raw/cancel", func(t *testing.T) {
		p := main
		m.rawCell(t, p, nil)
	})
	cell("protocol-3.2/raw/_pq_-option", func(t *testing.T) {
		p := main
		m.rawCell(t, p, []proto.StartupParam{{Name: "_pq_.pgmfa_matrix_unknown", Value: "on"}})
	})
}

// keyLen is the secret-key length the database hands a 3.2 client.
func (m *matrix) keyLen() int {
	if m.version >= 18 {
		return 32
	}
	return 4
}

func wrongCode(code string) string {
	b := []byte(code)
	b[0] = '0' + (b[0]-'0'+1)%10
	return string(b)
}

// expectLogin checks the proxy's login line: user, method (when given) and
// where the code came from.
func (m *matrix) expectLogin(t *testing.T, p *proxy, user, method, source string) {
	t.Helper()
	for _, l := range strings.Split(p.logs.String(), "\n") {
		if !strings.Contains(l, "msg=login ") || !strings.Contains(l, "user="+user+" ") || !strings.Contains(l, "result=ok") {
			continue
		}
		if method != "" && !strings.Contains(l, "method="+method+" ") {
			t.Fatalf("login line does not name method %s:\n%s", method, l)
		}
		if !strings.Contains(l, "mfa="+source) {
			t.Fatalf("login line does not name mfa=%s:\n%s", source, l)
		}
		return
	}
	t.Fatalf("no successful login line for %s:\n%s", user, p.logs.String())
}

// psqlLogin runs psql through the proxy (password in PGPASSWORD, the code,
// if any, in PGOPTIONS), checks it reached this version as user, and
// returns the output of extra (one statement), if given.
func (m *matrix) psqlLogin(t *testing.T, p *proxy, user, password, code string, extra []string) string {
	t.Helper()
	sql := "select current_user || ' ' || current_setting('server_version_num')"
	if len(extra) > 0 {
		sql = extra[0]
	}
	out, stderr, err := p.psql(user, password, code, sql)
	if err != nil {
		t.Fatalf("psql as %s: %v\n%s", user, err, stderr)
	}
	if len(extra) > 0 {
		return out
	}
	f := strings.Fields(out)
	if len(f) != 2 || f[0] != user || !strings.HasPrefix(f[1], strconv.Itoa(m.version)) {
		t.Fatalf("psql as %s reached %q, want %s on PostgreSQL %d", user, out, user, m.version)
	}
	return out
}

func (m *matrix) pgxLogin(t *testing.T, p *proxy, dsn, user string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("pgx as %s: %v", user, err)
	}
	defer conn.Close(ctx)
	m.checkSession(t, conn, user)
}

// checkSession: the session is user's, on this version, and the client
// holds the database's own BackendKeyData (its PID is the backend's).
func (m *matrix) checkSession(t *testing.T, conn *pgx.Conn, user string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var who string
	var num, pid int
	err := conn.QueryRow(ctx, "select current_user, current_setting('server_version_num')::int, pg_backend_pid()").Scan(&who, &num, &pid)
	if err != nil {
		t.Fatal(err)
	}
	if who != user || num/10000 != m.version {
		t.Fatalf("session of %q on %d, want %s on PostgreSQL %d", who, num, user, m.version)
	}
	if uint32(pid) != conn.PgConn().PID() {
		t.Fatalf("the client's key names PID %d, the backend is %d", conn.PgConn().PID(), pid)
	}
}

// cancelPgx runs pg_sleep through the proxy, cancels it with pgx's own
// CancelRequest (sent to the proxy) and checks the database canceled the
// statement (57014). It returns the secret key the client holds.
func (m *matrix) cancelPgx(t *testing.T, p *proxy, dsn string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	admin, err := pgx.Connect(ctx, m.pg.DSN(alice, alicePW, "app"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := conn.Exec(ctx, "select pg_sleep(60)")
		done <- err
	}()
	waitSleeping(t, admin, conn.PgConn().PID())
	if err := conn.PgConn().CancelRequest(ctx); err != nil {
		t.Fatalf("cancel request: %v", err)
	}
	err = <-done
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57014" {
		t.Fatalf("pg_sleep was not canceled by the database: %v", err)
	}
	return conn.PgConn().SecretKey()
}

// copyCell moves the same rows out and back in through the proxy and
// directly and compares the bytes; the session must have been spliced
// (when the kernel can) and ended cleanly.
func (m *matrix) copyCell(t *testing.T, p *proxy) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	direct, err := pgx.Connect(ctx, m.pg.DSN(alice, alicePW, "app"))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(ctx)
	const src = "copy (select g, md5(g::text), repeat(chr(65 + g % 26), g % 200), now()::date - g from generate_series(1, 20000) g) to stdout"
	var want bytes.Buffer
	if _, err := direct.PgConn().CopyTo(ctx, &want, src); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, p.dsn(alice, alicePW, "app", m.code(p, alice)))
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if _, err := conn.PgConn().CopyTo(ctx, &got, src); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Fatalf("COPY out through pgmfa differs: %d bytes, direct %d", got.Len(), want.Len())
	}
	if _, err := conn.Exec(ctx, "create table matrix_copy(a int, b text, c text, d date)"); err != nil {
		t.Fatal(err)
	}
	tag, err := conn.PgConn().CopyFrom(ctx, bytes.NewReader(want.Bytes()), "copy matrix_copy from stdin")
	if err != nil || tag.RowsAffected() != 20000 {
		t.Fatalf("COPY in through pgmfa: %v %v", tag, err)
	}
	client := conn.PgConn().Conn().LocalAddr().String()
	conn.Close(ctx)
	var back bytes.Buffer
	// Ordered: COPY FROM's multi-insert may place rows out of order in the
	// heap (seen on every version), so the table's physical order is no
	// evidence either way.
	if _, err := direct.PgConn().CopyTo(ctx, &back, "copy (select * from matrix_copy order by a) to stdout"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back.Bytes(), want.Bytes()) {
		i := 0
		for i < back.Len() && back.Bytes()[i] == want.Bytes()[i] {
			i++
		}
		lo := max(0, i-100)
		t.Fatalf("COPY in through pgmfa stored different bytes: %d, sent %d; first difference at %d:\n%q\n%q", back.Len(), want.Len(), i, back.Bytes()[lo:min(back.Len(), i+100)], want.Bytes()[lo:min(want.Len(), i+100)])
	}
	var end sessionEnd
	if !eventually(20*time.Second, func() bool {
		for _, e := range sessionEnds(p.logs.String()) {
			if e["client"] == client {
				end = e
				return true
			}
		}
		return false
	}) {
		t.Fatalf("no session end line:\n%s", p.logs.String())
	}
	if want := map[string]string{loop.SpliceSockmap: "sockmap", loop.SpliceOff: "relay"}[m.splice]; end["mode"] != want {
		t.Fatalf("session ended in mode %q, want %s:\n%s", end["mode"], want, end["_line"])
	}
	assertCleanEnd(t, end)
}

// pgbenchCell: Debian's pgbench, the code appended to the password, two
// clients of 50 transactions each admitted by --mfa-remember.
func (m *matrix) pgbenchCell(t *testing.T, p *proxy) {
	if _, err := exec.LookPath("pgbench"); err != nil {
		pgtest.SkipOrFail(t, "pgbench not installed")
	}
	script := filepath.Join(t.TempDir(), "s.sql")
	if err := os.WriteFile(script, []byte("select current_setting('server_version_num')::int / 10000;\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("pgbench", "-n", "-c", "2", "-j", "2", "-t", "50", "-f", script,
		"-h", p.host, "-p", strconv.Itoa(p.port), "-U", alice, "app")
	cmd.Env = append(os.Environ(), "PGPASSWORD="+alicePW+m.code(p, alice), "PGOPTIONS=", "PGSSLMODE=disable")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pgbench: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "number of transactions actually processed: 100/100") {
		t.Fatalf("pgbench did not finish every transaction:\n%s", out)
	}
}

// rawCell is the project's own protocol client asking for 3.2 (with extra
// startup parameters, e.g. _pq_ options): in front of 18 the session runs
// at 3.2 with the database's long key; in front of 13-17 the database's
// NegotiateProtocolVersion reaches the client and the session goes on at
// 3.0. Unknown _pq_ options come back in that message, as PostgreSQL
// reports them. Then a cancel in the negotiated length cancels pg_sleep.
func (m *matrix) rawCell(t *testing.T, p *proxy, extra []proto.StartupParam) {
	t.Helper()
	c := dialRaw(t, p)
	_ = c.conn.SetDeadline(time.Now().Add(90 * time.Second))
	params := append([]proto.StartupParam{
		{Name: "user", Value: alice}, {Name: "database", Value: "app"},
		{Name: "options", Value: "-c pgmfa.code=" + m.code(p, alice)},
	}, extra...)
	up := proto.NewUpstreamLogin(proto.UpstreamConfig{
		User: alice, Password: alicePW, Database: "app", Params: params,
		ProtocolVersion: pgproto3.ProtocolVersion32, Rand: rand.Reader,
	})
	c.write(up.Start())
	for done := false; !done; {
		msg, err := c.next()
		if err != nil {
			t.Fatalf("3.2 login: %v", err)
		}
		out, ready, err := up.Handle(msg)
		if err != nil {
			t.Fatalf("3.2 login: %v", err)
		}
		if len(out) > 0 {
			c.write(out)
		}
		done = ready
	}
	res := up.Result()
	var unknown []string
	for _, e := range extra {
		if strings.HasPrefix(e.Name, "_pq_.") {
			unknown = append(unknown, e.Name)
		}
	}
	switch {
	case m.version >= 18 && len(unknown) == 0:
		if res.Negotiate != nil {
			t.Fatalf("PostgreSQL %d speaks 3.2, yet the client got %+v", m.version, res.Negotiate)
		}
	default:
		n := res.Negotiate
		wantMinor := uint32(0)
		if m.version >= 18 {
			wantMinor = 2
		}
		// pgproto3 keeps the whole version (3<<16 | minor) in NewestMinorProtocol.
		if n == nil || n.NewestMinorProtocol != 3<<16|wantMinor || strings.Join(n.UnrecognizedOptions, ",") != strings.Join(unknown, ",") {
			t.Fatalf("NegotiateProtocolVersion %+v, want 3.%d rejecting %v", n, wantMinor, unknown)
		}
	}
	if res.Key == nil || len(res.Key.SecretKey) != m.keyLen() {
		t.Fatalf("key %+v, want the database's %d-byte secret", res.Key, m.keyLen())
	}
	// The key is the database's: its PID is the backend's, and a cancel
	// with its secret (the long form under 3.2) cancels.
	c.write(proto.Append(nil, &pgproto3.Query{String: "select pg_backend_pid()"}))
	rows, codes := rawUntilReady(t, c)
	if len(codes) != 0 || len(rows) != 1 || rows[0] != strconv.Itoa(int(res.Key.ProcessID)) {
		t.Fatalf("pg_backend_pid() = %v %v, key names %d", rows, codes, res.Key.ProcessID)
	}
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, m.pg.DSN(alice, alicePW, "app"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	c.write(proto.Append(nil, &pgproto3.Query{String: "select pg_sleep(60)"}))
	waitSleeping(t, admin, res.Key.ProcessID)
	sendCancel(t, p.host, p.port, false, res.Key.ProcessID, res.Key.SecretKey)
	if _, codes := rawUntilReady(t, c); len(codes) != 1 || codes[0] != "57014" {
		t.Fatalf("the 3.2 cancel did not cancel: %v", codes)
	}
}

// rawUntilReady reads a simple query's answer: first-column values and
// error codes, until ReadyForQuery.
func rawUntilReady(t *testing.T, c *rawClient) (rows, codes []string) {
	t.Helper()
	for {
		m, err := c.nextRaw()
		if err != nil {
			t.Fatalf("query: %v", err)
		}
		switch m.Type {
		case 'D':
			var d pgproto3.DataRow
			if err := d.Decode(m.Body); err != nil {
				t.Fatal(err)
			}
			rows = append(rows, string(d.Values[0]))
		case 'E':
			var e pgproto3.ErrorResponse
			if err := e.Decode(m.Body); err != nil {
				t.Fatal(err)
			}
			codes = append(codes, e.Code)
		case 'Z':
			return rows, codes
		}
	}
}
