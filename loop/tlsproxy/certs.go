package tlsproxy

import (
	"crypto/tls"
	"fmt"
	"sync/atomic"
)

// ALPN is the protocol name PostgreSQL registers for TLS ALPN. A direct TLS
// connection (PostgreSQL 17's sslnegotiation=direct) must offer it: that is
// what tells a PostgreSQL server apart from any other TLS service on the
// port, so a client cannot be tricked into talking to the wrong one.
const ALPN = "postgresql"

// Certs is the client-facing certificate and key, reloadable at run time
// (SIGHUP). Sessions already running keep the certificate they shook hands
// with; new handshakes get the current one.
type Certs struct {
	certFile, keyFile string
	cur               atomic.Pointer[tls.Certificate]
}

// LoadCerts reads a PEM certificate (chain) and its private key.
func LoadCerts(certFile, keyFile string) (*Certs, error) {
	c := &Certs{certFile: certFile, keyFile: keyFile}
	if err := c.Reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// Reload reads the files again. On error the pair in use is kept, so a
// half-written certificate during a renewal never takes TLS down.
func (c *Certs) Reload() error {
	pair, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("TLS certificate %s / key %s: %w", c.certFile, c.keyFile, err)
	}
	c.cur.Store(&pair)
	return nil
}

// Current returns the pair new handshakes use.
func (c *Certs) Current() *tls.Certificate { return c.cur.Load() }

// ServerConfig is the client-facing TLS configuration: TLS 1.2 at least
// (PostgreSQL's own ssl_min_protocol_version default), 1.3 whenever the
// client has it (crypto/tls always picks the highest common version), the
// current certificate on every handshake, and ALPN "postgresql".
//
// Renegotiation needs no setting: crypto/tls never renegotiates as a
// server (it neither starts one nor accepts a client's request), which is
// what PostgreSQL wants too since it dropped ssl_renegotiation_limit.
func (c *Certs) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return c.cur.Load(), nil
		},
		NextProtos: []string{ALPN},
	}
}
