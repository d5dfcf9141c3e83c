package loop_test

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/loop/tlsproxy/testpki"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

func testPKI(t *testing.T) *testpki.PKI {
	p, err := testpki.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// TestClientTLSThroughLoop: the gnet loop answers SSLRequest with 'S' and
// hands the connection to the TLS driver; psql verify-full and pgx with
// direct TLS log in with MFA; --tls require refuses plaintext.
func TestClientTLSThroughLoop(t *testing.T) {
	pki := testPKI(t)
	certs, err := tlsproxy.LoadCerts(pki.CertFile, pki.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) {
		c.TLSCerts, c.TLSMode = certs, session.TLSRequire
	})
	run := func(sslmode, code string) (string, error) {
		cmd := exec.Command("psql", "-X", "-At", "-c", "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
			"host=localhost port="+strconv.Itoa(p.port)+" user="+alice+" dbname=app sslmode="+sslmode+" sslrootcert="+pki.CAFile)
		cmd.Env = append(os.Environ(), "PGPASSWORD="+alicePW, "PGOPTIONS=-c pgmfa.code="+code)
		out, err := cmd.CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	out, err := run("verify-full", p.code(alice))
	if err != nil {
		t.Fatalf("psql verify-full: %v\n%s", err, out)
	}
	// The database side is plaintext here (pgmfa terminates TLS).
	if out != "f" {
		t.Fatalf("pg_stat_ssl says %q", out)
	}
	out, err = run("disable", p.code(bob))
	if err == nil || !strings.Contains(out, "sslmode=require") {
		t.Fatalf("--tls require let a plaintext client in or gave no hint: %v\n%s", err, out)
	}

	// pgx with direct TLS (ALPN "postgresql").
	cfg, err := pgx.ParseConfig("postgres://" + bob + ":" + bobPW + "@localhost:" + strconv.Itoa(p.port) +
		"/app?sslmode=verify-full&sslnegotiation=direct&sslrootcert=" + pki.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["options"] = "-c pgmfa.code=" + p.code(bob)
	conn, err := pgx.ConnectConfig(context.Background(), cfg)
	if err != nil {
		t.Fatalf("pgx direct TLS: %v", err)
	}
	var who string
	if err := conn.QueryRow(context.Background(), "select current_user").Scan(&who); err != nil || who != bob {
		t.Fatalf("current_user %q %v", who, err)
	}
	conn.Close(context.Background())
	if st := p.srv.StatsSnapshot(); st["tls"] < 2 {
		t.Fatalf("TLS sessions not counted: %v", st)
	}
}

// TestUpstreamTLSThroughLoop: with --upstream-sslmode verify-full every
// connection goes to the TLS driver at accept; a plaintext psql client logs
// in and the database session is encrypted; a wrong CA fails clearly.
func TestUpstreamTLSThroughLoop(t *testing.T) {
	pki := testPKI(t)
	pg := pgtest.Start(t, pgcluster.Options{
		Users: []pgcluster.User{{Name: alice, Password: alicePW}},
		SSL:   &pgcluster.SSLFiles{CertFile: pki.CertFile, KeyFile: pki.KeyFile},
	})
	for _, tc := range []struct {
		ca   string
		want string
	}{{pki.CAFile, "t"}, {pki.OtherCAFile, "certificate"}} {
		p := startProxy(t, mfa.Options{}, func(c *loop.Config) {
			c.Upstream = pg.Addr()
			c.UpstreamTLS = tlsproxy.UpstreamTLS{SSLMode: tlsproxy.SSLVerifyFull, RootCert: tc.ca, ServerName: "localhost"}
		})
		cmd := exec.Command("psql", "-X", "-At", "-h", p.host, "-p", strconv.Itoa(p.port), "-U", alice, "-d", "postgres",
			"-c", "select ssl from pg_stat_ssl where pid = pg_backend_pid()")
		cmd.Env = append(os.Environ(), "PGPASSWORD="+alicePW, "PGOPTIONS=-c pgmfa.code="+p.code(alice), "PGSSLMODE=disable")
		out, err := cmd.CombinedOutput()
		if tc.want == "t" && (err != nil || strings.TrimSpace(string(out)) != "t") {
			t.Fatalf("upstream verify-full: %v\n%s", err, out)
		}
		if tc.want != "t" && (err == nil || !strings.Contains(string(out), tc.want)) {
			t.Fatalf("wrong CA: want an error naming the %s, got %v\n%s", tc.want, err, out)
		}
	}
}
