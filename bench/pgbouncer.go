package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/loop/tlsproxy/testpki"
)

// startPgbouncer runs pgbouncer in session mode in front of the cluster,
// with the same authentication the database uses: scram-sha-256 against the
// SCRAM verifiers copied from pg_authid, so pgbouncer can log in upstream
// with the client's SCRAM keys. pgbouncer refuses to run as root, so it runs
// as the postgres user, which owns its directory. On the TLS path (pki is
// then required) clients must use TLS (client_tls_sslmode = require) with a
// copy of the suite's certificate and key in that directory; the server side
// stays plaintext, as on pgmfa's TLS path.
func startPgbouncer(ps *procs, name string, cl *pgcluster.Cluster, dir string, pki *testpki.PKI, users []string, maxClients int) *endpoint {
	ep := &endpoint{Name: name, Host: "127.0.0.1", TLS: isTLS(name)}
	if ep.TLS && pki == nil {
		ep.Err = fmt.Errorf("no certificates for client TLS")
		return ep
	}
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		for _, p := range []string{"/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer"} {
			if _, err2 := os.Stat(p); err2 == nil {
				bin, err = p, nil
			}
		}
	}
	if err != nil {
		ep.Err = fmt.Errorf("pgbouncer not installed (apt-get install -y pgbouncer, or make deps-bench)")
		return ep
	}
	if ep.Err = os.MkdirAll(dir, 0o700); ep.Err != nil {
		return ep
	}
	// The auth file: "user" "SCRAM-SHA-256$...".
	quoted := make([]string, len(users))
	for i, u := range users {
		quoted[i] = pgcluster.QuoteLiteral(u)
	}
	rows, err := cl.Psql("SELECT rolname || ' ' || rolpassword FROM pg_authid WHERE rolname IN (" + strings.Join(quoted, ",") + ") ORDER BY 1")
	if err != nil {
		ep.Err = fmt.Errorf("read SCRAM verifiers: %w", err)
		return ep
	}
	var auth strings.Builder
	for _, l := range strings.Split(rows, "\n") {
		if name, verifier, ok := strings.Cut(l, " "); ok {
			fmt.Fprintf(&auth, "%q %q\n", name, verifier)
		}
	}
	if ep.Port, ep.Err = pgcluster.FreePort(); ep.Err != nil {
		return ep
	}
	ep.LogFile = filepath.Join(dir, "pgbouncer.log")
	ini := fmt.Sprintf(`[databases]
* = host=127.0.0.1 port=%d

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = scram-sha-256
auth_file = %s
pool_mode = session
max_client_conn = %d
default_pool_size = %d
max_db_connections = 0
admin_users = %s
ignore_startup_parameters = extra_float_digits
logfile = %s
`, cl.Port, ep.Port, filepath.Join(dir, "userlist.txt"), maxClients+100, maxClients+50, users[0], ep.LogFile)
	files := map[string]string{"userlist.txt": auth.String()}
	if ep.TLS {
		// pgbouncer (as postgres) cannot read the suite's PKI directory.
		for _, f := range []struct{ from, to string }{{pki.CertFile, "server.pem"}, {pki.KeyFile, "server.key"}} {
			b, err := os.ReadFile(f.from)
			if err != nil {
				ep.Err = fmt.Errorf("TLS certificate: %w", err)
				return ep
			}
			files[f.to] = string(b)
		}
		ini += fmt.Sprintf("client_tls_sslmode = require\nclient_tls_cert_file = %s\nclient_tls_key_file = %s\n",
			filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key"))
	}
	files["pgbouncer.ini"] = ini
	for fn, body := range files {
		if ep.Err = os.WriteFile(filepath.Join(dir, fn), []byte(body), 0o600); ep.Err != nil {
			return ep
		}
	}
	cred, err := postgresUser()
	if err != nil {
		ep.Err = err
		return ep
	}
	if cred != nil {
		_ = os.Chown(dir, int(cred.Uid), int(cred.Gid))
		for fn := range files {
			_ = os.Chown(filepath.Join(dir, fn), int(cred.Uid), int(cred.Gid))
		}
	}
	cmd := exec.Command(bin, filepath.Join(dir, "pgbouncer.ini"))
	cmd.Dir = dir
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	ep.CmdLine = cmd.Args
	if ep.Err = ps.start(cmd); ep.Err != nil {
		return ep
	}
	ep.Cmd = cmd
	ep.Drain = func(ctx context.Context) error { return pgbouncerReconnect(ctx, ep, users[0]) }
	if err := ps.waitListening(cmd, ep.Addr(), 10*time.Second); err != nil {
		ep.Err = fmt.Errorf("pgbouncer %v; log:\n%s", err, tail(ep.LogFile, 1500))
	}
	return ep
}

// pgbouncerReconnect makes pgbouncer close its idle server connections
// (admin console RECONNECT). The pool stays warm between workloads, as in
// production, except after the held-sessions workloads, whose
// -sessions server connections would otherwise occupy PostgreSQL for
// server_idle_timeout (10 minutes).
func pgbouncerReconnect(ctx context.Context, ep *endpoint, admin string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := pgconn.Connect(ctx, fmt.Sprintf("host=%s port=%d user=%s password=%s dbname=pgbouncer sslmode=%s", ep.Host, ep.Port, admin, benchPassword, ep.sslmode()))
	if err != nil {
		return fmt.Errorf("pgbouncer admin console: %w", err)
	}
	defer c.Close(context.Background())
	_, err = c.Exec(ctx, "RECONNECT").ReadAll()
	return err
}

// postgresUser is the credential for processes that refuse root; nil when
// the suite does not run as root.
func postgresUser() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("no postgres system user to run pgbouncer as: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// tail returns the last n bytes of a file, for error messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}
