// Package pgcluster starts throwaway PostgreSQL clusters for tests, the
// benchmark suite and `make run` (cmd/pgmfa-demo).
//
// A cluster lives in a fresh temporary directory, listens on a free loopback
// port and on a private unix-socket directory, and is owned by the `postgres`
// system user because initdb and postgres refuse to run as root. Any major
// version can be started (Options.Version): the distribution's own server
// under /usr/lib/postgresql, or the builds `make deps-pg-servers` installs
// into the server cache (see ServerCacheDirs). The package installs nothing:
// when the server binaries are missing, Start returns ErrNoBinaries; `make
// test` installs them.
//
// The package does not import testing (the demo binary links it); the
// testing.TB helpers live in bench/pgcluster/pgtest.
package pgcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrNoBinaries means no PostgreSQL server binaries were found.
var ErrNoBinaries = errors.New("pgcluster: PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; install them with `apt-get install -y postgresql` or set PGBIN")

// ErrNotRoot means the process can start no server: initdb and postgres
// refuse root, so pgcluster runs them as the postgres user, which needs root
// (or being postgres already).
var ErrNotRoot = errors.New("pgcluster: must run as root or as the postgres user to start a cluster")

// Auth methods understood in pg_hba.conf that the tests use.
const (
	Trust       = "trust"
	Password    = "password"
	MD5         = "md5"
	ScramSHA256 = "scram-sha-256"
)

// Superuser is the bootstrap superuser. It always authenticates with trust
// over the private unix socket (so the harness can administer the cluster)
// and with the cluster's method everywhere else.
const Superuser = "postgres"

// User is a role created after initdb.
type User struct {
	Name     string
	Password string // empty: no password
	// Method overrides the cluster's pg_hba method for this user (TCP and
	// unix socket alike). Empty means Options.Method.
	Method    string
	Superuser bool
}

// Options configures a cluster. The zero value is a scram-sha-256 cluster
// with only the superuser.
type Options struct {
	// Method is the pg_hba method for every user without an override.
	Method string
	// Users are created (with password_encryption matching their method, so
	// md5 users get md5 verifiers) once the server is up.
	Users []User
	// SuperuserPassword is set on the bootstrap superuser (default "postgres").
	SuperuserPassword string
	// Settings are appended to postgresql.conf (name -> value, quoted as needed
	// by the caller, e.g. "log_statement": "'all'").
	Settings map[string]string
	// ExtraHBA lines are placed before the generated rules.
	ExtraHBA []string
	// Databases to create, owned by the superuser, in addition to "postgres".
	Databases []string
	// Log receives the output of the harness's pg_ctl and psql commands when
	// set (e.g. t.Logf). The server log itself stays in Cluster.LogFile.
	Log func(format string, args ...any)
	// SSL turns on TLS in the server with this certificate and key.
	SSL *SSLFiles
	// Version is the server's major version (13, 14, ...): found by
	// BinDirFor. Zero means the default server (BinDir).
	Version int
	// BinDir names the server's bin directory outright (wins over Version).
	BinDir string
}

// SSLFiles are a PEM certificate and key for the server's TLS. They are
// copied into the data directory (owned by postgres, the key 0600, as the
// server insists).
type SSLFiles struct{ CertFile, KeyFile string }

// Cluster is a running PostgreSQL server.
type Cluster struct {
	Host      string // "127.0.0.1"
	Port      int
	SocketDir string // private unix-socket directory (psql -h SocketDir)
	DataDir   string
	LogFile   string
	BinDir    string
	Version   int // the server's major version (0: unknown)

	root    string
	opts    Options
	stopped sync.Once
	stopErr error
}

// BinDir finds the PostgreSQL server binaries: $PGBIN, pg_config --bindir,
// then the Debian locations newest first.
func BinDir() (string, error) {
	if d := os.Getenv("PGBIN"); d != "" && hasServer(d) {
		return d, nil
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		if d := strings.TrimSpace(string(out)); hasServer(d) {
			return d, nil
		}
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(matches, func(i, j int) bool { return versionOf(matches[i]) > versionOf(matches[j]) })
	for _, d := range matches {
		if hasServer(d) {
			return d, nil
		}
	}
	return "", ErrNoBinaries
}

// hasServer reports whether dir holds the three server binaries.
func hasServer(dir string) bool {
	for _, b := range []string{"initdb", "pg_ctl", "postgres"} {
		if st, err := os.Stat(filepath.Join(dir, b)); err != nil || st.IsDir() {
			return false
		}
	}
	return true
}

// ServerCacheDirs are where bench/pgcluster/install-servers.sh (`make
// deps-pg-servers`) puts server builds, as <dir>/<major>/bin: $PGMFA_PG_CACHE,
// ${XDG_CACHE_HOME:-$HOME/.cache}/pgmfa/pg, and /var/cache/pgmfa/pg (used
// when running as root, whose 0700 home the postgres user cannot enter).
func ServerCacheDirs() []string {
	var dirs []string
	if d := os.Getenv("PGMFA_PG_CACHE"); d != "" {
		dirs = append(dirs, d)
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		dirs = append(dirs, filepath.Join(d, "pgmfa", "pg"))
	} else if h, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(h, ".cache", "pgmfa", "pg"))
	}
	return append(dirs, "/var/cache/pgmfa/pg")
}

// BinDirFor finds the server binaries of one major version: the server
// cache first (ServerCacheDirs), then the distribution's
// /usr/lib/postgresql/<major>/bin.
func BinDirFor(major int) (string, error) {
	var tried []string
	for _, c := range ServerCacheDirs() {
		d := filepath.Join(c, strconv.Itoa(major), "bin")
		if hasServer(d) {
			return d, nil
		}
		tried = append(tried, d)
	}
	d := fmt.Sprintf("/usr/lib/postgresql/%d/bin", major)
	if hasServer(d) {
		return d, nil
	}
	tried = append(tried, d)
	return "", fmt.Errorf("%w: PostgreSQL %d (looked in %s; `make deps-pg-servers` installs 13-18)",
		ErrNoBinaries, major, strings.Join(tried, ", "))
}

// ServerVersion runs `postgres --version` in binDir and returns the major
// version (0 when it cannot tell).
func ServerVersion(binDir string) int {
	out, err := exec.Command(filepath.Join(binDir, "postgres"), "--version").Output()
	if err != nil {
		return 0
	}
	// "postgres (PostgreSQL) 18.4" or "... 15.18 (Debian 15.18-0+deb12u1)"
	f := strings.Fields(string(out))
	if len(f) < 3 {
		return 0
	}
	v, _ := strconv.Atoi(strings.SplitN(f[2], ".", 2)[0])
	return v
}

func versionOf(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// FreePort asks the kernel for a free loopback TCP port.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Start creates and starts a cluster. Call Stop to stop it and remove its
// files.
func Start(opts Options) (*Cluster, error) {
	bin, err := opts.BinDir, error(nil)
	switch {
	case bin != "":
		if !hasServer(bin) {
			err = fmt.Errorf("%w in %s", ErrNoBinaries, bin)
		}
	case opts.Version != 0:
		bin, err = BinDirFor(opts.Version)
	default:
		bin, err = BinDir()
	}
	if err != nil {
		return nil, err
	}
	if opts.Method == "" {
		opts.Method = ScramSHA256
	}
	if opts.SuperuserPassword == "" {
		opts.SuperuserPassword = "postgres"
	}
	cred, err := postgresCredential()
	if err != nil {
		return nil, err
	}
	root, err := os.MkdirTemp("", "pgcluster-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{
		Host:      "127.0.0.1",
		SocketDir: filepath.Join(root, "sock"),
		DataDir:   filepath.Join(root, "data"),
		LogFile:   filepath.Join(root, "server.log"),
		BinDir:    bin,
		Version:   ServerVersion(bin),
		root:      root,
		opts:      opts,
	}
	if err := c.start(cred); err != nil {
		_ = c.Stop()
		return nil, err
	}
	return c, nil
}

// postgresCredential returns the credential to run server binaries with:
// nil when we already are a non-root user, the postgres user when root.
func postgresCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		u, err := user.Current()
		if err == nil && u.Username == "postgres" {
			return nil, nil
		}
		return nil, ErrNotRoot
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("pgcluster: no postgres system user (install the postgresql package): %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func (c *Cluster) start(cred *syscall.Credential) error {
	// Traversable (not listable) by everyone so that a proxy under test that
	// runs as an unprivileged user can still reach the unix socket; the data
	// directory itself is 0700 (initdb insists).
	for _, d := range []string{c.root, c.SocketDir} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return err
		}
		if err := os.Chmod(d, 0o711); err != nil {
			return err
		}
		if cred != nil {
			if err := os.Chown(d, int(cred.Uid), int(cred.Gid)); err != nil {
				return err
			}
		}
	}
	pwfile := filepath.Join(c.root, "pwfile")
	if err := os.WriteFile(pwfile, []byte(c.opts.SuperuserPassword+"\n"), 0o600); err != nil {
		return err
	}
	if cred != nil {
		_ = os.Chown(pwfile, int(cred.Uid), int(cred.Gid))
	}
	if out, err := c.run(cred, "initdb", "-D", c.DataDir, "-U", Superuser, "--pwfile", pwfile,
		"-A", "trust", "-E", "UTF8", "--locale", "C", "--no-sync"); err != nil {
		return fmt.Errorf("initdb: %v\n%s", err, out)
	}
	_ = os.Remove(pwfile)

	if err := os.WriteFile(filepath.Join(c.DataDir, "pg_hba.conf"), []byte(c.hba()), 0o600); err != nil {
		return err
	}
	var conf bytes.Buffer
	fmt.Fprintf(&conf, "\n# pgcluster\nunix_socket_directories = '%s'\nlisten_addresses = '127.0.0.1'\n", c.SocketDir)
	conf.WriteString("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\nshared_buffers = 128MB\n")
	conf.WriteString("password_encryption = 'scram-sha-256'\nlogging_collector = off\n")
	keys := make([]string, 0, len(c.opts.Settings))
	for k := range c.opts.Settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&conf, "%s = %s\n", k, c.opts.Settings[k])
	}
	f, err := os.OpenFile(filepath.Join(c.DataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if c.opts.SSL != nil {
		if err := c.copySSL(cred); err != nil {
			f.Close()
			return err
		}
		conf.WriteString("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
	}
	if _, err := f.Write(conf.Bytes()); err != nil {
		f.Close()
		return err
	}
	f.Close()
	if cred != nil {
		for _, p := range []string{"pg_hba.conf"} {
			_ = os.Chown(filepath.Join(c.DataDir, p), int(cred.Uid), int(cred.Gid))
		}
	}

	// A port can be taken between FreePort and the server's bind; retry a few
	// times on a fresh port rather than failing a whole test run.
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := FreePort()
		if err != nil {
			return err
		}
		c.Port = port
		out, err := c.run(cred, "pg_ctl", "-D", c.DataDir, "-l", c.LogFile, "-w", "-t", "60",
			"-o", fmt.Sprintf("-p %d", port), "start")
		if err == nil {
			lastErr = nil
			break
		}
		lastErr = fmt.Errorf("pg_ctl start: %v\n%s\n%s", err, out, c.tailLog())
	}
	if lastErr != nil {
		return lastErr
	}
	return c.provision()
}

// copySSL copies Options.SSL into the data directory as server.crt and
// server.key.
func (c *Cluster) copySSL(cred *syscall.Credential) error {
	for _, cp := range []struct{ from, to string }{
		{c.opts.SSL.CertFile, "server.crt"}, {c.opts.SSL.KeyFile, "server.key"},
	} {
		b, err := os.ReadFile(cp.from)
		if err != nil {
			return fmt.Errorf("pgcluster: SSL: %w", err)
		}
		dst := filepath.Join(c.DataDir, cp.to)
		if err := os.WriteFile(dst, b, 0o600); err != nil {
			return err
		}
		if cred != nil {
			if err := os.Chown(dst, int(cred.Uid), int(cred.Gid)); err != nil {
				return err
			}
		}
	}
	return nil
}

func (c *Cluster) hba() string {
	var b strings.Builder
	b.WriteString("# generated by pgcluster\n")
	for _, l := range c.opts.ExtraHBA {
		b.WriteString(l + "\n")
	}
	// The harness administers the cluster over the private socket.
	fmt.Fprintf(&b, "local all %s trust\n", Superuser)
	for _, u := range c.opts.Users {
		if u.Method != "" {
			for _, typ := range []string{"local all", "host all"} {
				addr := ""
				if typ == "host all" {
					addr = " 127.0.0.1/32"
				}
				fmt.Fprintf(&b, "%s %s%s %s\n", typ, quoteHBA(u.Name), addr, u.Method)
			}
		}
	}
	fmt.Fprintf(&b, "local all all %s\nhost all all 127.0.0.1/32 %s\nhost all all ::1/128 %s\n",
		c.opts.Method, c.opts.Method, c.opts.Method)
	return b.String()
}

func quoteHBA(name string) string { return `"` + strings.ReplaceAll(name, `"`, `""`) + `"` }

// provision creates the users and databases through psql over the socket.
func (c *Cluster) provision() error {
	var sql strings.Builder
	for _, u := range c.opts.Users {
		enc := "scram-sha-256"
		if u.Method == MD5 || (u.Method == "" && c.opts.Method == MD5) {
			enc = "md5"
		}
		fmt.Fprintf(&sql, "SET password_encryption = '%s';\n", enc)
		attrs := "LOGIN"
		if u.Superuser {
			attrs += " SUPERUSER"
		}
		if u.Password != "" {
			attrs += " PASSWORD " + QuoteLiteral(u.Password)
		}
		fmt.Fprintf(&sql, "CREATE ROLE %s %s;\n", QuoteIdent(u.Name), attrs)
	}
	for _, d := range c.opts.Databases {
		fmt.Fprintf(&sql, "CREATE DATABASE %s;\n", QuoteIdent(d))
	}
	if sql.Len() == 0 {
		return nil
	}
	_, err := c.Psql(sql.String())
	return err
}

// Psql runs SQL as the superuser over the private socket and returns psql's
// unaligned, tuples-only output.
func (c *Cluster) Psql(sql string) (string, error) {
	return c.PsqlDB("postgres", sql)
}

// PsqlDB is Psql against a named database.
func (c *Cluster) PsqlDB(db, sql string) (string, error) {
	cmd := exec.Command(filepath.Join(c.BinDir, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
		"-h", c.SocketDir, "-p", strconv.Itoa(c.Port), "-U", Superuser, "-d", db, "-f", "-")
	if _, err := os.Stat(cmd.Path); err != nil {
		cmd.Path, _ = exec.LookPath("psql")
	}
	cmd.Stdin = strings.NewReader(sql)
	cmd.Env = append(os.Environ(), "PGAPPNAME=pgcluster", "PGOPTIONS=")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("psql: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimRight(stdout.String(), "\n"), nil
}

// Addr is the TCP address "127.0.0.1:port".
func (c *Cluster) Addr() string { return net.JoinHostPort(c.Host, strconv.Itoa(c.Port)) }

// SocketPath is the unix-socket path PostgreSQL listens on.
func (c *Cluster) SocketPath() string {
	return filepath.Join(c.SocketDir, fmt.Sprintf(".s.PGSQL.%d", c.Port))
}

// DSN is a libpq/pgx URL for a user over TCP.
func (c *Cluster) DSN(user, password, db string) string {
	return DSN(c.Host, c.Port, user, password, db)
}

// DSN builds a postgres:// URL with sslmode=disable.
func DSN(host string, port int, user, password, db string) string {
	if db == "" {
		db = "postgres"
	}
	u := "postgres://" + urlEscape(user)
	if password != "" {
		u += ":" + urlEscape(password)
	}
	return fmt.Sprintf("%s@%s/%s?sslmode=disable", u, net.JoinHostPort(host, strconv.Itoa(port)), urlEscape(db))
}

func urlEscape(s string) string {
	var b strings.Builder
	for _, r := range []byte(s) {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.' || r == '~' {
			b.WriteByte(r)
		} else {
			fmt.Fprintf(&b, "%%%02X", r)
		}
	}
	return b.String()
}

// QuoteIdent quotes an SQL identifier.
func QuoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// QuoteLiteral quotes an SQL string literal.
func QuoteLiteral(s string) string { return `'` + strings.ReplaceAll(s, `'`, `''`) + `'` }

// PID returns the postmaster's PID (0 when not running).
func (c *Cluster) PID() int {
	b, err := os.ReadFile(filepath.Join(c.DataDir, "postmaster.pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
	return pid
}

// Children lists the child processes of pid — for a postmaster, its
// backends and auxiliary processes — from
// /proc/<pid>/task/<pid>/children (the postmaster is single-threaded, so
// its main thread has them all). Nil when it cannot be read.
func Children(pid int) []int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + strconv.Itoa(pid) + "/children")
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// Stop stops the server (fast shutdown) and removes the cluster's files.
// It is safe to call more than once.
func (c *Cluster) Stop() error {
	c.stopped.Do(func() {
		if c.Port != 0 && c.PID() != 0 {
			cred, _ := postgresCredential()
			if out, err := c.run(cred, "pg_ctl", "-D", c.DataDir, "-m", "fast", "-w", "-t", "30", "stop"); err != nil {
				// Immediate mode as a last resort; the PID is ours.
				if _, err2 := c.run(cred, "pg_ctl", "-D", c.DataDir, "-m", "immediate", "-w", "stop"); err2 != nil {
					c.stopErr = fmt.Errorf("pg_ctl stop: %v\n%s", err, out)
				}
			}
		}
		if c.stopErr == nil && os.Getenv("PGCLUSTER_KEEP") == "" {
			c.stopErr = os.RemoveAll(c.root)
		}
	})
	return c.stopErr
}

// Log returns the server log so far.
func (c *Cluster) Log() string {
	b, _ := os.ReadFile(c.LogFile)
	return string(b)
}

func (c *Cluster) tailLog() string {
	l := c.Log()
	if len(l) > 4000 {
		l = l[len(l)-4000:]
	}
	return l
}

func (c *Cluster) run(cred *syscall.Credential, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(c.BinDir, name), args...)
	cmd.Dir = c.root
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C", "TZ=UTC"}
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	out, err := cmd.CombinedOutput()
	if c.opts.Log != nil && len(out) > 0 && name != "initdb" {
		c.opts.Log("%s: %s", name, strings.TrimSpace(string(out)))
	}
	return out, err
}
