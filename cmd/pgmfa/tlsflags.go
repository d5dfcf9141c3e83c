package main

import (
	"errors"
	"flag"
	"fmt"

	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/proto/session"
)

// tlsFlags are serve's TLS flags: the client-facing certificate and policy,
// and TLS towards the database with libpq's sslmode names.
type tlsFlags struct {
	cert, key, mode               string
	upMode, upRoot, upCert, upKey string
	upServerName, upNegotiation   string
}

func (f *tlsFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.cert, "tls-cert", "", "PEM certificate (chain) clients see; with --tls-key enables TLS for clients (reloaded on SIGHUP)")
	fs.StringVar(&f.key, "tls-key", "", "PEM private key of --tls-cert")
	fs.StringVar(&f.mode, "tls", "", "client TLS: disable, allow (TLS when the client asks, plaintext otherwise) or require (plaintext logins refused); default: allow when --tls-cert is given, else disable. TLS sessions are relayed in user space, never spliced in the kernel")
	fs.StringVar(&f.upMode, "upstream-sslmode", tlsproxy.SSLDisable, "TLS towards PostgreSQL, as libpq's sslmode: disable, prefer, require, verify-ca or verify-full. The default, disable, keeps sessions spliceable in the kernel; any other mode relays every session through the proxy's user space")
	fs.StringVar(&f.upRoot, "upstream-sslrootcert", "", "PEM CA certificates to verify PostgreSQL's certificate with (verify-ca, verify-full; with require it turns on chain verification, as in libpq); \"system\" for the system CA pool")
	fs.StringVar(&f.upCert, "upstream-sslcert", "", "PEM client certificate pgmfa presents to PostgreSQL (optional, with --upstream-sslkey)")
	fs.StringVar(&f.upKey, "upstream-sslkey", "", "PEM private key of --upstream-sslcert")
	fs.StringVar(&f.upServerName, "upstream-sslservername", "", "the name verify-full checks PostgreSQL's certificate against (default: the host of --upstream)")
	fs.StringVar(&f.upNegotiation, "upstream-sslnegotiation", tlsproxy.NegotiatePostgres, "how TLS towards PostgreSQL starts, as libpq's sslnegotiation: postgres (SSLRequest first, every version) or direct (TLS at once with ALPN, PostgreSQL 17 and later; needs --upstream-sslmode require or stronger)")
}

// build checks the flags and loads the certificate. The upstream TLS
// settings are checked against the resolved --upstream (files readable, no
// TLS over a unix socket) by loop.New, which dials with them, so mistakes
// stop the start rather than every login.
func (f *tlsFlags) build() (certs *tlsproxy.Certs, mode session.TLSMode, up tlsproxy.UpstreamTLS, err error) {
	if (f.cert == "") != (f.key == "") {
		return nil, 0, up, errors.New("--tls-cert and --tls-key go together")
	}
	switch f.mode {
	case "":
		mode = session.TLSOff
		if f.cert != "" {
			mode = session.TLSAllow
		}
	case "disable":
		mode = session.TLSOff
	case "allow":
		mode = session.TLSAllow
	case "require":
		mode = session.TLSRequire
	default:
		return nil, 0, up, fmt.Errorf("--tls must be disable, allow or require, not %q", f.mode)
	}
	if mode != session.TLSOff && f.cert == "" {
		return nil, 0, up, fmt.Errorf("--tls %s needs --tls-cert and --tls-key", f.mode)
	}
	if mode != session.TLSOff {
		if certs, err = tlsproxy.LoadCerts(f.cert, f.key); err != nil {
			return nil, 0, up, err
		}
	}
	up = tlsproxy.UpstreamTLS{
		SSLMode:    f.upMode,
		RootCert:   f.upRoot,
		Cert:       f.upCert,
		Key:        f.upKey,
		ServerName: f.upServerName,

		SSLNegotiation: f.upNegotiation,
	}
	return certs, mode, up, nil
}
