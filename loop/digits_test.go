package loop_test

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

// pkiCerts is a test PKI with the proxy's certificate loaded.
type pkiCerts struct {
	caFile string
	certs  *tlsproxy.Certs
}

func newPKICerts(t *testing.T) *pkiCerts {
	pki := testPKI(t)
	certs, err := tlsproxy.LoadCerts(pki.CertFile, pki.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	return &pkiCerts{caFile: pki.CAFile, certs: certs}
}

// TestTOTPDigits8: with 8-digit codes and --auth password, the code split
// off the password is 8 digits long on every path: plaintext clients,
// clients that ask for TLS, and every client when the database side uses
// TLS.
func TestTOTPDigits8(t *testing.T) {
	opts := mfa.Options{Digits: 8}
	enroll8 := func(p *proxy) {
		t.Helper()
		key, err := p.store.Enroll(alice, mfa.EnrollOptions{Digits: 8}, true)
		if err != nil {
			t.Fatal(err)
		}
		p.secrets[alice] = key.Secret()
	}
	code8 := func(p *proxy) string {
		t.Helper()
		c, err := p.guard.Code(alice, time.Now())
		if err != nil || len(c) != 8 {
			t.Fatalf("8-digit code: %q %v", c, err)
		}
		return c
	}
	psql := func(p *proxy, conninfo, code string) (string, error) {
		cmd := exec.Command("psql", "-X", "-At", "-c", "select current_user",
			"host="+p.host+" port="+strconv.Itoa(p.port)+" user="+alice+" "+conninfo)
		cmd.Env = append(os.Environ(), "PGPASSWORD="+alicePW+code, "PGOPTIONS=", "PGCONNECT_TIMEOUT=20")
		out, err := cmd.CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	password := func(c *loop.Config) {
		c.Auth = session.AuthPassword
		c.AllowCleartextPassword = true
	}

	t.Run("plaintext", func(t *testing.T) {
		p := startProxy(t, opts, password)
		enroll8(p)
		if out, err := psql(p, "dbname=app sslmode=disable", code8(p)); err != nil || out != alice {
			t.Fatalf("8-digit code after the password: %v\n%s", err, out)
		}
	})
	t.Run("client TLS", func(t *testing.T) {
		pki := newPKICerts(t)
		p := startProxy(t, opts, func(c *loop.Config) {
			password(c)
			c.TLSCerts, c.TLSMode = pki.certs, session.TLSRequire
		})
		enroll8(p)
		if out, err := psql(p, "dbname=app sslmode=require", code8(p)); err != nil || out != alice {
			t.Fatalf("8-digit code after the password over TLS: %v\n%s", err, out)
		}
	})
	t.Run("upstream TLS", func(t *testing.T) {
		pki := testPKI(t)
		pg := pgtest.Start(t, pgcluster.Options{
			Users: []pgcluster.User{{Name: alice, Password: alicePW}},
			SSL:   &pgcluster.SSLFiles{CertFile: pki.CertFile, KeyFile: pki.KeyFile},
		})
		p := startProxy(t, opts, func(c *loop.Config) {
			password(c)
			c.Upstream = pg.Addr()
			c.UpstreamTLS = tlsproxy.UpstreamTLS{SSLMode: tlsproxy.SSLVerifyFull, RootCert: pki.CAFile, ServerName: "localhost"}
		})
		enroll8(p)
		if out, err := psql(p, "dbname=postgres sslmode=disable", code8(p)); err != nil || out != alice {
			t.Fatalf("8-digit code after the password, database over TLS: %v\n%s", err, out)
		}
	})
}
