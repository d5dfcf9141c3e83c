package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"net"
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
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/loop/tlsproxy/testpki"
)

// The passwords of the account test: the database role's, which only
// pgmfa holds, and the people's own, which the database never sees.
const (
	dbRolePW = "db-only-Secret-77"
	alicePW  = "alice-own-Pass-1"
	bobPW    = "bob-own-Pass-2"
)

// accountEnv is a PostgreSQL with the role app_rw and a pgmfa binary, a
// store and a key file to hold accounts in.
type accountEnv struct {
	t                      *testing.T
	bin, store, key, dbpwf string
	db                     *pgcluster.Cluster
	pgStore                bool // the store is in db (schema pgmfa), not a file
}

func (e *accountEnv) run(stdin string, args ...string) (string, error) {
	cmd := exec.Command(e.bin, args...)
	cmd.Env = append(os.Environ(), "PGMFA_STORE=", "PGMFA_STORE_KEY_FILE=", "PGMFA_STORE_KEY=", "PGMFA_ADMIN=")
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (e *accountEnv) must(stdin string, args ...string) string {
	e.t.Helper()
	out, err := e.run(stdin, args...)
	if err != nil {
		e.t.Fatalf("pgmfa %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (e *accountEnv) storeArgs() []string {
	return []string{"--store", e.store, "--store-key-file", e.key}
}

// TestAccountCLI: bad input is refused with a clear error and exit 1, and
// the store holds verifiers and sealed credentials only.
func TestAccountCLI(t *testing.T) {
	e := newAccountEnv(t, false)
	sa := e.storeArgs()
	e.must(alicePW+"\n", append([]string{"account", "add", "--role", "app_rw", "--db-password-file", e.dbpwf, "alice"}, sa...)...)
	for _, tc := range []struct {
		stdin string
		args  []string
		want  string
	}{
		{"x\n", []string{"account", "add", "alice"}, "already exists"},
		{"", []string{"account", "remove", "ghost"}, "no such account"},
		{"x\n", []string{"account", "passwd", "ghost"}, "no such account"},
		{"", []string{"account", "add", "carol"}, "no password on standard input"},
		{"x\n", []string{"account", "add", "--scram-iterations", "0", "carol"}, "--scram-iterations"},
	} {
		out, err := e.run(tc.stdin, append(tc.args, sa...)...)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out, tc.want) {
			t.Errorf("pgmfa %v: %v, want exit 1 with %q:\n%s", tc.args, err, tc.want, out)
		}
	}
	// A database password is stored only encrypted.
	out, err := e.run("x\n", "account", "add", "--store", e.store, "--store-key-file", "", "--db-password-file", e.dbpwf, "carol")
	if err == nil || !strings.Contains(out, "encrypted") {
		t.Errorf("database password without a key: %v\n%s", err, out)
	}
	e.must(bobPW+"\n", append([]string{"account", "add", "--md5", "bob"}, sa...)...)
	e.must("new-"+alicePW+"\n", append([]string{"account", "passwd", "alice"}, sa...)...)
	if got := e.must("", append([]string{"account", "list"}, sa...)...); got != "alice\trole=app_rw\tverifier=scram-sha-256\nbob\trole=bob\tverifier=md5\n" {
		t.Errorf("list:\n%s", got)
	}
	e.must("", append([]string{"account", "remove", "bob"}, sa...)...)
	if got := e.must("", append([]string{"account", "list"}, sa...)...); strings.Contains(got, "bob") {
		t.Errorf("bob still listed:\n%s", got)
	}
	e.assertNoSecrets()
}

func (e *accountEnv) assertNoSecrets() {
	e.t.Helper()
	var raw []byte
	var err error
	if e.pgStore {
		var dump string
		dump, err = e.db.Psql(`SELECT row_to_json(a)::text FROM pgmfa.accounts a UNION ALL SELECT row_to_json(x)::text FROM pgmfa.account_secret x UNION ALL SELECT row_to_json(u)::text FROM pgmfa.users u`)
		if !strings.Contains(dump, "alice") {
			e.t.Fatalf("no account in the store's tables:\n%s", dump)
		}
		raw = []byte(dump)
	} else {
		raw, err = os.ReadFile(e.store)
	}
	if err != nil {
		e.t.Fatal(err)
	}
	for _, s := range []string{dbRolePW, alicePW, bobPW} {
		if strings.Contains(string(raw), s) {
			e.t.Errorf("the store holds %q:\n%s", s, raw)
		}
	}
}

func newAccountEnv(t *testing.T, withDB bool) *accountEnv {
	return newAccountEnvStore(t, withDB, false)
}

// newAccountEnvStore is newAccountEnv with, if pgStore, the store in the
// database under test (schema pgmfa, initialised by `pgmfa store init`).
func newAccountEnvStore(t *testing.T, withDB, pgStore bool) *accountEnv {
	t.Helper()
	e := &accountEnv{t: t, bin: buildBinary(t)}
	dir := t.TempDir()
	e.store, e.key, e.dbpwf = filepath.Join(dir, "store.json"), filepath.Join(dir, "store.key"), filepath.Join(dir, "dbpw")
	if err := os.WriteFile(e.dbpwf, []byte(dbRolePW+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	e.must("", "store", "new-key", "--store-key-file", e.key)
	if withDB {
		e.db = pgtest.Start(t, pgcluster.Options{
			Users:     []pgcluster.User{{Name: "app_rw", Password: dbRolePW}},
			Databases: []string{"app"},
			Settings:  map[string]string{"log_connections": "on"},
		})
	}
	if pgStore {
		e.pgStore = true
		e.store = e.db.DSN(pgcluster.Superuser, "postgres", "postgres")
		e.must("", "store", "init", "--store", e.store)
	}
	return e
}

// serve starts pgmfa serve --auth accounts with flags, and returns its
// port and a function returning its log.
func (e *accountEnv) serve(flags ...string) (int, func() string) {
	t := e.t
	port, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"serve", "--listen", "127.0.0.1:" + strconv.Itoa(port), "--upstream", e.db.Addr(),
		"--admin", "", "--loops", "1", "--auth", "accounts"}, e.storeArgs()...)
	cmd := exec.Command(e.bin, append(args, flags...)...)
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
	log := func() string { mu.Lock(); defer mu.Unlock(); return logs.String() }
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
			t.Logf("pgmfa serve log:\n%s", log())
		}
	})
	if !eventually(30*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}) {
		t.Fatalf("pgmfa serve did not start:\n%s", log())
	}
	return port, log
}

func withCode(dsn, code string) string {
	if code == "" {
		return dsn
	}
	return dsn + "&options=" + strings.ReplaceAll(url.QueryEscape("-c pgmfa.code="+code), "+", "%20")
}

// scramFirst opens a raw login as user and returns the salt and iteration
// count of the server's first SCRAM message.
func scramFirst(t *testing.T, port int, user string) (salt, iter string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	fe := pgproto3.NewFrontend(c, c)
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: map[string]string{"user": user, "database": "app"}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	m, err := fe.Receive()
	if _, ok := m.(*pgproto3.AuthenticationSASL); !ok || err != nil {
		t.Fatalf("%s: want AuthenticationSASL, got %T %v", user, m, err)
	}
	fe.Send(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte("n,,n=,r=clientnonceclientnonce")})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	m, err = fe.Receive()
	sc, ok := m.(*pgproto3.AuthenticationSASLContinue)
	if !ok || err != nil {
		t.Fatalf("%s: want SASLContinue, got %T %v", user, m, err)
	}
	for _, kv := range strings.Split(string(sc.Data), ",") {
		switch {
		case strings.HasPrefix(kv, "s="):
			salt = kv[2:]
		case strings.HasPrefix(kv, "i="):
			iter = kv[2:]
		}
	}
	return salt, iter
}

// TestAccountsLogin runs --auth accounts against a real PostgreSQL with
// pgx and psql: people log in with their own passwords (SCRAM, and MD5 for
// an account stored so) and a TOTP code, and the database sees the mapped
// role, with application_name naming the account; a wrong password and an
// unknown user fail alike, the database password itself is refused, a
// wrong code is refused, and no refused login ever reaches the database.
func TestAccountsLogin(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	t.Run("file store", func(t *testing.T) { testAccountsLogin(t, newAccountEnvStore(t, true, false)) })
	t.Run("postgres store", func(t *testing.T) { testAccountsLogin(t, newAccountEnvStore(t, true, true)) })
}

func testAccountsLogin(t *testing.T, e *accountEnv) {
	sa := e.storeArgs()
	e.must(alicePW+"\n", append([]string{"account", "add", "--role", "app_rw", "--db-password-file", e.dbpwf, "alice"}, sa...)...)
	e.must(bobPW+"\n", append([]string{"account", "add", "--md5", "--role", "app_rw", "--db-password-file", e.dbpwf, "bob"}, sa...)...)
	// pgbouncer users, with verifiers PostgreSQL made: carol's SCRAM one
	// (from pg_authid), dave's MD5 one (PostgreSQL's md5() of password and
	// name, as pgbouncer and PostgreSQL store it).
	vs, err := e.db.Psql(`SET password_encryption = 'scram-sha-256'; CREATE ROLE carol_src PASSWORD 'carol-pw';
		SELECT rolpassword FROM pg_authid WHERE rolname = 'carol_src'; SELECT 'md5' || md5('dave-pw' || 'dave')`)
	lines := strings.Split(vs, "\n")
	if err != nil || len(lines) != 2 {
		t.Fatalf("verifiers from PostgreSQL: %v %q", err, vs)
	}
	ul := filepath.Join(t.TempDir(), "userlist.txt")
	if err := os.WriteFile(ul, []byte(`"carol" "`+lines[0]+`"`+"\n"+`"dave" "`+lines[1]+`"`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	imp := append([]string{"account", "import", "--userlist", ul, "--role", "app_rw", "--db-password-file", e.dbpwf}, sa...)
	if out := e.must("", imp...); !strings.Contains(out, "Imported 2 accounts") {
		t.Fatalf("import: %s", out)
	}
	if out, err := e.run("", imp...); err == nil || !strings.Contains(out, "already accounts, nothing was imported: carol, dave") {
		t.Fatalf("second import: %v\n%s", err, out)
	}
	for _, u := range []string{"alice", "bob", "carol", "dave"} {
		e.must("", append([]string{"enroll", "--qr=false", u}, sa...)...)
	}
	e.assertNoSecrets()
	port, _ := e.serve("--account-method", "md5")
	code := func(user string) string {
		return strings.TrimSpace(e.must("", append(append([]string{"code"}, sa...), user)...))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Sessions of the mapped role (a PostgreSQL store has its own).
	received := func() int { return strings.Count(e.db.Log(), "connection authorized: user=app_rw") }
	base := received()

	refused := func(user, pw, code string) *pgconn.PgError {
		t.Helper()
		c, err := pgx.Connect(ctx, withCode(pgcluster.DSN("127.0.0.1", port, user, pw, "app"), code))
		if err == nil {
			c.Close(ctx)
			t.Fatalf("%s with %q logged in", user, pw)
		}
		var pe *pgconn.PgError
		if !errors.As(err, &pe) {
			t.Fatalf("%s: %v", user, err)
		}
		return pe
	}
	// The unknown user's exchange looks like a real one: a salt that is
	// the same on every attempt and the iteration count real verifiers have.
	s1, i1 := scramFirst(t, port, "mallory")
	s2, i2 := scramFirst(t, port, "mallory")
	s3, _ := scramFirst(t, port, "mallet")
	_, ia := scramFirst(t, port, "alice")
	if s1 != s2 || s1 == s3 || i1 != i2 || i1 != ia || len(s1) != 24 {
		t.Errorf("unknown users' salts %q %q %q, iterations %s (alice: %s)", s1, s2, s3, i1, ia)
	}
	wrong := refused("alice", "not-"+alicePW, "")
	unknown := refused("mallory", "not-"+alicePW, "")
	if wrong.Code != "28P01" || unknown.Code != wrong.Code ||
		strings.ReplaceAll(wrong.Message, "alice", "X") != strings.ReplaceAll(unknown.Message, "mallory", "X") {
		t.Errorf("wrong password %v, unknown user %v: want the same 28P01", wrong, unknown)
	}
	if pe := refused("bob", "not-"+bobPW, ""); pe.Code != "28P01" {
		t.Errorf("md5 wrong password: %v", pe)
	}
	if pe := refused("alice", dbRolePW, code("alice")); pe.Code != "28P01" {
		t.Errorf("the database password accepted as alice's: %v", pe)
	}
	if pe := refused("alice", alicePW, "000000"); pe.Code != "28000" {
		t.Errorf("wrong code: %v", pe)
	}

	// pgx, SCRAM.
	c, err := pgx.Connect(ctx, withCode(pgcluster.DSN("127.0.0.1", port, "alice", alicePW, "app"), code("alice")))
	if err != nil {
		t.Fatal(err)
	}
	var role, app string
	if err := c.QueryRow(ctx, "select current_user, application_name from pg_stat_activity where pid = pg_backend_pid()").Scan(&role, &app); err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)
	if role != "app_rw" || app != "alice" {
		t.Errorf("pgx session runs as %q with application_name %q, want app_rw and alice", role, app)
	}
	// psql, MD5.
	cmd := exec.CommandContext(ctx, "psql", "-X", "-At", "-h", "127.0.0.1", "-p", strconv.Itoa(port), "-U", "bob", "-d", "app",
		"-c", "select current_user || ' ' || application_name from pg_stat_activity where pid = pg_backend_pid()")
	cmd.Env = append(os.Environ(), "PGPASSWORD="+bobPW, "PGOPTIONS=-c pgmfa.code="+code("bob"), "PGAPPNAME=psql", "PGSSLMODE=disable")
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "app_rw bob/psql" {
		t.Errorf("psql as bob: %v: %q", err, out)
	}
	// Imported pgbouncer users log in with the passwords they had.
	for _, u := range []struct{ name, pw string }{{"carol", "carol-pw"}, {"dave", "dave-pw"}} {
		c, err := pgx.Connect(ctx, withCode(pgcluster.DSN("127.0.0.1", port, u.name, u.pw, "app"), code(u.name)))
		if err != nil {
			t.Errorf("imported %s: %v", u.name, err)
			continue
		}
		if err := c.QueryRow(ctx, "select current_user, application_name from pg_stat_activity where pid = pg_backend_pid()").Scan(&role, &app); err != nil || role != "app_rw" || app != u.name {
			t.Errorf("imported %s: %q %q %v", u.name, role, app, err)
		}
		c.Close(ctx)
	}
	// Only the four sessions that passed both factors reached the database.
	if !eventually(30*time.Second, func() bool { return received() >= base+4 }) {
		t.Fatalf("the database did not log the four sessions:\n%s", e.db.Log())
	}
	time.Sleep(200 * time.Millisecond) // a straggler would have been logged with them
	if got := received() - base; got != 4 {
		t.Errorf("the database authorized %d sessions of app_rw, want 4 (refused logins must not reach it)", got)
	}
}

// TestAccountsCleartextOverTLS: with --account-method password the TLS
// driver asks for the cleartext password, checks it against the SCRAM
// verifier and takes the code off its end; over plaintext pgmfa refuses to
// ask for it. A login without a code waits for `pgmfa approve` and is
// released by it (the database is dialed only then).
func TestAccountsCleartextOverTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	e := newAccountEnvStore(t, true, false)
	sa := e.storeArgs()
	e.must(alicePW+"\n", append([]string{"account", "add", "--role", "app_rw", "--db-password-file", e.dbpwf, "alice"}, sa...)...)
	e.must(alicePW+"\n", append([]string{"account", "add", "--role", "app_rw", "--db-password-file", e.dbpwf, "erin"}, sa...)...)
	for _, u := range []string{"alice", "erin"} {
		e.must("", append([]string{"enroll", "--qr=false", u}, sa...)...)
	}
	pki, err := testpki.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pki.Close() })
	admin := filepath.Join(t.TempDir(), "admin.sock")
	port, _ := e.serve("--account-method", "password", "--tls-cert", pki.CertFile, "--tls-key", pki.KeyFile, "--admin", admin)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	code := strings.TrimSpace(e.must("", append(append([]string{"code"}, sa...), "alice")...))
	dsn := pgcluster.DSN("127.0.0.1", port, "alice", alicePW+code, "app")
	_, err = pgx.Connect(ctx, dsn)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "28000" || !strings.Contains(pe.Message, "unencrypted") {
		t.Fatalf("cleartext over plaintext: %v", err)
	}
	c, err := pgx.Connect(ctx, strings.Replace(dsn, "sslmode=disable", "sslmode=require", 1))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var role, app string
	var ssl bool
	if err := c.QueryRow(ctx, "select current_user, application_name, ssl from pg_stat_activity join pg_stat_ssl using (pid) where pid = pg_backend_pid()").Scan(&role, &app, &ssl); err != nil {
		t.Fatal(err)
	}
	if role != "app_rw" || app != "alice" || ssl {
		t.Errorf("session as %q, application_name %q, upstream TLS %v", role, app, ssl)
	}
	if !c.PgConn().Conn().(interface{ ConnectionState() tls.ConnectionState }).ConnectionState().HandshakeComplete {
		t.Error("the client side is not TLS")
	}

	// erin sends no code: the login waits, and the database has not
	// been dialed for it, until an approval.
	before := strings.Count(e.db.Log(), "connection authorized: user=app_rw")
	done := make(chan error, 1)
	go func() {
		c, err := pgx.Connect(ctx, strings.Replace(pgcluster.DSN("127.0.0.1", port, "erin", alicePW, "app"), "sslmode=disable", "sslmode=require", 1))
		if err == nil {
			var name string
			err = c.QueryRow(ctx, "select application_name from pg_stat_activity where pid = pg_backend_pid()").Scan(&name)
			if err == nil && name != "erin" {
				err = errors.New("application_name " + name)
			}
			c.Close(ctx)
		}
		done <- err
	}()
	if !eventually(30*time.Second, func() bool {
		out, _ := e.run("", "approve", "--list", "--admin", admin)
		return strings.Contains(out, "erin")
	}) {
		t.Fatal("erin's login is not waiting for approval")
	}
	if got := strings.Count(e.db.Log(), "connection authorized: user=app_rw"); got != before {
		t.Errorf("the database was dialed for a login waiting for MFA (%d sessions, before %d)", got, before)
	}
	code = strings.TrimSpace(e.must("", append(append([]string{"code"}, sa...), "erin")...))
	if out, err := e.run("", "approve", "--admin", admin, "erin", code); err != nil {
		t.Fatalf("approve: %v\n%s", err, out)
	}
	if err := <-done; err != nil {
		t.Fatalf("the approved login: %v", err)
	}
}

// jdbcLogin is a JDBC client run with java's single-file source launcher:
// args are URL, user, password; it prints current_user and
// application_name of its session.
const jdbcLogin = `import java.sql.*;
public class Login {
  public static void main(String[] a) throws Exception {
    try (Connection c = DriverManager.getConnection(a[0], a[1], a[2]);
         ResultSet r = c.createStatement().executeQuery(
           "select current_user || ' ' || application_name from pg_stat_activity where pid = pg_backend_pid()")) {
      r.next();
      System.out.println(r.getString(1));
    }
  }
}
`

// psycopgLogin is the same with psycopg2 (libpq).
const psycopgLogin = `import sys, psycopg2
c = psycopg2.connect(host="127.0.0.1", port=sys.argv[1], user=sys.argv[2], password=sys.argv[3], dbname="app",
                     options="-c pgmfa.code=" + sys.argv[4], application_name="psycopg", sslmode="disable")
cur = c.cursor()
cur.execute("select current_user || ' ' || application_name from pg_stat_activity where pid = pg_backend_pid()")
print(cur.fetchone()[0])
`

// nodeLogin is the same with node-postgres (pure JavaScript, its own SCRAM
// client); the code goes in the startup "options", as with libpq.
const nodeLogin = `const { Client } = require('pg');
const [port, user, password, code] = process.argv.slice(2);
(async () => {
  const c = new Client({ host: '127.0.0.1', port: Number(port), user, password, database: 'app',
    options: '-c pgmfa.code=' + code, application_name: 'node', ssl: false });
  await c.connect();
  const r = await c.query("select current_user || ' ' || application_name as s from pg_stat_activity where pid = pg_backend_pid()");
  console.log(r.rows[0].s);
  await c.end();
})().catch((e) => { console.error(e.code, e.message); process.exit(1); });
`

// nodeModules is where `make deps-clients` installs node-postgres.
const nodeModules = "/var/cache/pgmfa/node/node_modules"

// TestAccountsOtherClients: psycopg2, the PostgreSQL JDBC driver and
// node-postgres log in with SCRAM and a code, and their sessions run as the
// mapped role.
func TestAccountsOtherClients(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	python, jar := "/usr/bin/python3", "/usr/share/java/postgresql.jar"
	if exec.Command(python, "-c", "import psycopg2").Run() != nil {
		pgtest.SkipOrFail(t, "psycopg2 is not installed for %s (Debian package python3-psycopg2; make deps-clients)", python)
	}
	java, err := exec.LookPath("java")
	if _, serr := os.Stat(jar); err != nil || serr != nil {
		pgtest.SkipOrFail(t, "java or the JDBC driver is missing (Debian packages default-jdk-headless, libpostgresql-jdbc-java; make deps-clients)")
	}
	node, err := exec.LookPath("node")
	if _, serr := os.Stat(filepath.Join(nodeModules, "pg", "package.json")); err != nil || serr != nil {
		pgtest.SkipOrFail(t, "node or node-postgres is missing (nodejs and npm; make deps-clients installs pg into %s)", filepath.Dir(nodeModules))
	}
	e := newAccountEnv(t, true)
	sa := e.storeArgs()
	for _, u := range []string{"py", "jdbc", "node"} {
		e.must(u+"-"+alicePW+"\n", append([]string{"account", "add", "--role", "app_rw", "--db-password-file", e.dbpwf, u}, sa...)...)
		e.must("", append([]string{"enroll", "--qr=false", u}, sa...)...)
	}
	port, serveLog := e.serve()
	code := func(user string) string {
		return strings.TrimSpace(e.must("", append(append([]string{"code"}, sa...), user)...))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	script := filepath.Join(t.TempDir(), "login.py")
	if err := os.WriteFile(script, []byte(psycopgLogin), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, python, script, strconv.Itoa(port), "py", "py-"+alicePW, code("py")).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "app_rw py/psycopg" {
		t.Errorf("psycopg2: %v: %s", err, out)
	}

	src := filepath.Join(t.TempDir(), "Login.java")
	if err := os.WriteFile(src, []byte(jdbcLogin), 0o600); err != nil {
		t.Fatal(err)
	}
	// Without assumeMinServerVersion=9.0 pgjdbc sends ApplicationName with
	// a SET after the login, which replaces the account's label (checked:
	// "app_rw jdbc-app"); with it, in the startup packet.
	jdbcURL := "jdbc:postgresql://127.0.0.1:" + strconv.Itoa(port) + "/app?sslmode=disable&assumeMinServerVersion=9.0&ApplicationName=jdbc-app&options=" +
		strings.ReplaceAll(url.QueryEscape("-c pgmfa.code="+code("jdbc")), "+", "%20")
	out, err = exec.CommandContext(ctx, java, "-cp", jar, src, jdbcURL, "jdbc", "jdbc-"+alicePW).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "app_rw jdbc/jdbc-app" {
		t.Errorf("JDBC: %v: %s", err, out)
	}

	js := filepath.Join(t.TempDir(), "login.js")
	if err := os.WriteFile(js, []byte(nodeLogin), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, node, js, strconv.Itoa(port), "node", "node-"+alicePW, code("node"))
	cmd.Env = append(os.Environ(), "NODE_PATH="+nodeModules)
	out, err = cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "app_rw node/node" {
		t.Errorf("node-postgres: %v: %s", err, out)
	}
	// Every one of them answered SCRAM (the mode's default), none fell
	// back to something weaker.
	for _, u := range []string{"py", "jdbc", "node"} {
		if !strings.Contains(serveLog(), "user="+u+" database=app method=scram-sha-256 mfa=code") {
			t.Errorf("no SCRAM login with a code logged for %s:\n%s", u, serveLog())
		}
	}
}
