package tlsproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/proto"
)

// The sslmode values, as libpq names them.
const (
	SSLDisable    = "disable"
	SSLPrefer     = "prefer"
	SSLRequire    = "require"
	SSLVerifyCA   = "verify-ca"
	SSLVerifyFull = "verify-full"
)

// The sslnegotiation values, as libpq ≥ 17 names them.
const (
	// NegotiatePostgres: SSLRequest first, TLS after the server's 'S'.
	NegotiatePostgres = "postgres"
	// NegotiateDirect: the TLS handshake at once, ALPN "postgresql"
	// required (PostgreSQL ≥ 17; older servers read the ClientHello as a
	// startup packet of a bad length and close).
	NegotiateDirect = "direct"
)

// UpstreamTLS is TLS towards PostgreSQL, with libpq's names and meanings.
type UpstreamTLS struct {
	// SSLMode: disable | prefer | require | verify-ca | verify-full. Empty
	// means disable (pgmfa's default, so that sessions can be spliced).
	SSLMode string
	// RootCert is a PEM file of CA certificates to verify the server with
	// (verify-ca, verify-full; with require it turns on chain verification
	// as in libpq). "system" means the system's CA pool, as libpq ≥ 16.
	RootCert string
	// Cert and Key are a client certificate for the database (optional;
	// both or neither).
	Cert, Key string
	// ServerName is the name verify-full checks the certificate against;
	// empty means the host part of the upstream address.
	ServerName string
	// SSLNegotiation: postgres (empty) or direct, as libpq's
	// sslnegotiation. direct saves the SSLRequest round trip and needs
	// sslmode require or stronger (libpq refuses prefer with it too: a
	// server that cannot do TLS could not fall back).
	SSLNegotiation string
}

// NeedsDriver reports whether sessions must go through this package because
// the database side may use TLS (any sslmode but disable).
func (u UpstreamTLS) NeedsDriver() bool {
	return u.SSLMode != "" && u.SSLMode != SSLDisable
}

// Dialer returns a function that connects to PostgreSQL at addr and, as the
// sslmode says, negotiates TLS: SSLRequest, then 'S' → TLS client handshake
// with libpq's verification for that mode, or 'N' → plaintext (prefer) or
// an error (require, verify-*); with SSLNegotiation direct, the handshake
// at once. Configuration mistakes (unknown mode,
// unreadable files, TLS over a unix socket) are reported now, not per login.
// sockBuf, when positive, is the TCP socket's SO_SNDBUF and SO_RCVBUF
// (--socket-buffer), set before connect so that the window scale the SYN
// offers fits it.
func Dialer(addr net.Addr, u UpstreamTLS, sockBuf int) (func(ctx context.Context) (net.Conn, error), error) {
	mode := u.SSLMode
	if mode == "" {
		mode = SSLDisable
	}
	direct := false
	switch u.SSLNegotiation {
	case "", NegotiatePostgres:
	case NegotiateDirect:
		if mode == SSLDisable || mode == SSLPrefer {
			return nil, fmt.Errorf("--upstream-sslnegotiation=direct needs --upstream-sslmode require, verify-ca or verify-full, not %s", mode)
		}
		direct = true
	default:
		return nil, fmt.Errorf("--upstream-sslnegotiation must be postgres or direct, not %q", u.SSLNegotiation)
	}
	network, address := addr.Network(), addr.String()
	_, isUnix := addr.(*net.UnixAddr)
	if network == "unix" {
		isUnix = true
	}
	var d net.Dialer
	if sockBuf > 0 && !isUnix {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				if serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, sockBuf); serr == nil {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, sockBuf)
				}
			}); err != nil {
				return err
			}
			if serr != nil {
				return fmt.Errorf("--socket-buffer %d: %w", sockBuf, serr)
			}
			return nil
		}
	}
	plain := func(ctx context.Context) (net.Conn, error) {
		return d.DialContext(ctx, network, address)
	}
	switch mode {
	case SSLDisable:
		return plain, nil
	case SSLPrefer, SSLRequire, SSLVerifyCA, SSLVerifyFull:
	default:
		return nil, fmt.Errorf("--upstream-sslmode must be disable, prefer, require, verify-ca or verify-full, not %q", u.SSLMode)
	}
	if isUnix {
		if mode == SSLPrefer {
			// libpq does not attempt TLS over a unix socket either.
			return plain, nil
		}
		return nil, fmt.Errorf("--upstream-sslmode=%s with a unix-socket upstream (%s): PostgreSQL does not do TLS over unix sockets; use a host:port upstream or sslmode disable/prefer", mode, address)
	}
	cfg, err := clientConfig(addr, u, mode)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) (net.Conn, error) {
		raw, err := plain(ctx)
		if err != nil {
			return nil, err
		}
		c, err := negotiate(ctx, raw, cfg, mode, direct)
		if err != nil {
			raw.Close()
			return nil, err
		}
		return c, nil
	}, nil
}

// clientConfig builds the TLS client configuration for an sslmode.
func clientConfig(addr net.Addr, u UpstreamTLS, mode string) (*tls.Config, error) {
	serverName := u.ServerName
	if serverName == "" {
		host, _, err := net.SplitHostPort(addr.String())
		if err != nil {
			return nil, fmt.Errorf("upstream address %s: %w", addr, err)
		}
		serverName = host
	}
	cfg := &tls.Config{
		// The name verify-full checks, and SNI in every mode (as libpq's
		// sslsni=1 default; crypto/tls sends no SNI for an IP address).
		ServerName: serverName,
		MinVersion: tls.VersionTLS12,
		// PostgreSQL 17 checks ALPN when the client offers it; older
		// servers ignore it. libpq ≥ 17 always offers it.
		NextProtos: []string{ALPN},
	}
	if (u.Cert == "") != (u.Key == "") {
		return nil, errors.New("--upstream-sslcert and --upstream-sslkey go together")
	}
	if u.Cert != "" {
		pair, err := tls.LoadX509KeyPair(u.Cert, u.Key)
		if err != nil {
			return nil, fmt.Errorf("--upstream-sslcert/--upstream-sslkey: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	var roots *x509.CertPool
	switch u.RootCert {
	case "":
		if mode == SSLVerifyCA || mode == SSLVerifyFull {
			return nil, fmt.Errorf("--upstream-sslmode=%s needs --upstream-sslrootcert (a PEM file of CA certificates, or \"system\")", mode)
		}
	case "system":
		pool, err := x509.SystemCertPool()
		if err != nil {
			return nil, fmt.Errorf("--upstream-sslrootcert=system: %w", err)
		}
		roots = pool
	default:
		pem, err := os.ReadFile(u.RootCert)
		if err != nil {
			return nil, fmt.Errorf("--upstream-sslrootcert: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--upstream-sslrootcert %s: no PEM certificate found", u.RootCert)
		}
	}
	switch {
	case mode == SSLVerifyFull:
		cfg.RootCAs = roots
	case roots != nil && mode != SSLPrefer:
		// verify-ca, and require with a root certificate (libpq then
		// behaves as verify-ca): the chain is checked, the name is not.
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = verifyChain(roots)
	default:
		// prefer, and require without a root certificate: encryption
		// without authentication of the server, as libpq does.
		cfg.InsecureSkipVerify = true
	}
	return cfg, nil
}

// verifyChain checks the server's chain against roots without a host name.
func verifyChain(roots *x509.CertPool) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("the server sent no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter})
		return err
	}
}

// negotiate runs the PostgreSQL SSL negotiation on raw and, on 'S', the TLS
// client handshake; direct skips the SSLRequest.
func negotiate(ctx context.Context, raw net.Conn, cfg *tls.Config, mode string, direct bool) (net.Conn, error) {
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl)
	}
	// A deadline in the past when ctx ends unblocks the exchange below
	// (proxy shutdown, login given up).
	stop := context.AfterFunc(ctx, func() { _ = raw.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if direct {
		return handshake(ctx, raw, cfg, mode, true)
	}
	if _, err := raw.Write(proto.Append(nil, &pgproto3.SSLRequest{})); err != nil {
		return nil, fmt.Errorf("send SSLRequest: %w", err)
	}
	// Exactly one byte, unbuffered: anything the server (or a man in the
	// middle) sent after it is read by the TLS handshake and fails it,
	// rather than being taken as if it had come encrypted (CVE-2021-23222).
	var b [1]byte
	if _, err := io.ReadFull(raw, b[:]); err != nil {
		return nil, fmt.Errorf("read the answer to SSLRequest: %w", err)
	}
	switch b[0] {
	case 'S':
	case 'N':
		if mode == SSLPrefer {
			_ = raw.SetDeadline(time.Time{})
			return raw, nil
		}
		return nil, fmt.Errorf("server does not support SSL, but sslmode=%s (--upstream-sslmode)", mode)
	case 'E':
		return nil, errors.New("server answered SSLRequest with an error (a pre-7.0 server?)")
	default:
		return nil, fmt.Errorf("received invalid response to SSL negotiation: %q", b[0])
	}
	return handshake(ctx, raw, cfg, mode, false)
}

// handshake runs the TLS client handshake. Direct TLS requires the server
// to have chosen ALPN "postgresql", as libpq 17 requires (the ALPN is what
// tells a PostgreSQL server from any TLS server on that port).
func handshake(ctx context.Context, raw net.Conn, cfg *tls.Config, mode string, direct bool) (net.Conn, error) {
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		hint := handshakeHint(err)
		if direct && hint == "" {
			// Seen against PostgreSQL 13-16: the server reads the
			// ClientHello as a startup packet and closes (EOF or reset).
			hint = " (direct TLS needs PostgreSQL 17 or later; older servers need --upstream-sslnegotiation postgres)"
		}
		return nil, fmt.Errorf("TLS handshake with the database (sslmode=%s): %w%s", mode, err, hint)
	}
	if direct && tc.ConnectionState().NegotiatedProtocol != ALPN {
		tc.Close()
		return nil, fmt.Errorf("direct TLS: the database did not select ALPN %q (not a PostgreSQL 17 or later server?)", ALPN)
	}
	_ = raw.SetDeadline(time.Time{})
	return tc, nil
}

// handshakeHint names the flag to look at for a verification failure.
func handshakeHint(err error) string {
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	switch {
	case errors.As(err, &ua):
		return " (check --upstream-sslrootcert)"
	case errors.As(err, &hn):
		return " (the name checked is the --upstream host, or --upstream-sslservername)"
	case errors.As(err, &ci):
		return " (the database's certificate is not valid)"
	}
	return ""
}
