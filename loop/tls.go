package loop

import (
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/proto/session"
)

// TLS: crypto/tls is a blocking API, so connections that need it — a
// client asking for TLS, or every connection when the database side uses
// TLS — leave the gnet loop for package tlsproxy, which runs them on
// goroutines and relays them in user space (TLS sessions cannot be spliced
// in the kernel here). Plaintext sessions never leave the loop's model.

// setUpTLS builds the TLS driver when the configuration needs one.
func (s *Server) setUpTLS() error {
	if s.cfg.TLSCerts == nil && !s.cfg.UpstreamTLS.NeedsDriver() {
		return nil
	}
	dial, err := tlsproxy.Dialer(s.upAddr, s.cfg.UpstreamTLS, s.cfg.SocketBuf)
	if err != nil {
		return err
	}
	s.tls = tlsproxy.New(tlsproxy.Config{
		Certs:            s.cfg.TLSCerts,
		Mode:             s.tlsMode(),
		Session:          s.sessionConfig(),
		DialUpstream:     dial,
		UpstreamName:     s.upName,
		HandshakeTimeout: s.cfg.HandshakeTimeout,
		StartupTimeout:   s.cfg.StartupTimeout,
		MFATimeout:       s.cfg.MFATimeout,
		Logger:           s.log,
		Hooks: tlsproxy.Hooks{
			MFA:            s.gate.Ask,
			RegisterCancel: s.cancels.add,
			RouteCancel:    s.routeCancel,
			LoginDone:      s.countLogin,
			Observer:       s.cfg.Observer,
			Established:    s.tlsEstablished,
		},
	})
	s.upstreamTLS = s.cfg.UpstreamTLS.NeedsDriver()
	return nil
}

func (s *Server) tlsMode() session.TLSMode {
	if s.cfg.TLSCerts == nil {
		return session.TLSOff
	}
	return s.cfg.TLSMode
}

// sessionConfig is the login machine's configuration for this server, for
// plaintext and TLS connections alike.
func (s *Server) sessionConfig() session.Config {
	return session.Config{
		Auth:           s.cfg.Auth,
		MaxMessageLen:  s.cfg.MaxMessageLen,
		CodeDigits:     s.codeDigits(),
		AllowCleartext: s.cfg.AllowCleartextPassword,
		Rand:           s.cfg.Rand,
		TLS:            s.tlsMode(),
		Accounts:       s.cfg.Accounts,
		AccountMethod:  s.cfg.AccountMethod,
	}
}

// codeDigits is the length of the code split off a password (--auth
// password): the guard's code length (--totp-digits).
func (s *Server) codeDigits() int {
	if s.cfg.Guard != nil {
		return s.cfg.Guard.Options().Digits
	}
	return 0
}

// handoffTLS gives a client connection to the TLS driver: after its
// SSLRequest was answered (reply 'S'), at a direct TLS ClientHello, or from
// its first byte (start == false) when the database side needs TLS. In
// OnOpen gnet must close the conn itself (atOpen): the caller returns
// gnet.Close.
func (c *conn) handoffTLS(reply []byte, start, direct, atOpen bool) {
	if c.client == nil {
		c.close(nil)
		return
	}
	fd, readAhead, ok := c.dupClient()
	if !ok {
		return
	}
	nc, err := tlsproxy.FileConn(fd)
	if err != nil {
		c.closeOnError(err)
		return
	}
	c.detach(atOpen)
	c.srv.stats.TLS.Add(1)
	c.srv.tls.Serve(tlsproxy.Handoff{
		Conn: nc, ReadAhead: readAhead, Reply: reply,
		StartTLS: start, Direct: direct, ID: c.id, Addr: c.addr,
	}, c.srv.release)
}

// tlsSide marks a gnet conn handed to the TLS driver at open.
type tlsSide struct{}
