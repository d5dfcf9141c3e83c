package tlsproxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

// handshake runs the TLS server handshake on the client socket, prefix
// being bytes of it already read. It reports whether it succeeded; on
// failure the connection is closed without a plaintext error (the client
// expects TLS bytes, and an unauthenticated peer gets no explanation).
func (s *sess) handshake(prefix []byte, direct bool) bool {
	cfg := s.d.serverTLS
	if direct {
		cfg = s.d.directTLS
	}
	if cfg == nil {
		s.close(errors.New("TLS requested but no certificate is configured"))
		return false
	}
	tc := tls.Server(&prefixConn{Conn: s.h.Conn, prefix: prefix}, cfg)
	ctx, cancel := context.WithDeadline(s.d.ctx, s.deadline)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		s.d.log.Info("TLS handshake failed", "conn", s.h.ID, "client", s.h.Addr, "direct", direct, "err", err.Error())
		s.close(fmt.Errorf("TLS handshake: %w", err))
		return false
	}
	s.client = tc
	s.m.SetEncrypted()
	return true
}

// dial opens the database connection (TLS per --upstream-sslmode) under
// the login's deadline.
func (s *sess) dial() {
	s.endStartup()
	dialf := s.d.cfg.DialUpstream
	if dialf == nil {
		s.act(s.m.UpstreamFailed(s.d.cfg.UpstreamName, errors.New("no upstream dialer configured")))
		return
	}
	ctx, cancel := context.WithDeadline(s.d.ctx, s.deadline)
	c, err := dialf(ctx)
	cancel()
	if err != nil {
		s.act(s.m.UpstreamFailed(s.d.cfg.UpstreamName, err))
		return
	}
	if !s.setUpstream(c) {
		s.close(errShutdown)
		return
	}
	s.up = c
	_ = c.SetWriteDeadline(s.deadline)
	s.spawn(func() { s.pump(c, s.uin, false) })
	s.act(s.m.UpstreamConnected())
}

// askMFA hands the request to the proxy's MFA service; the decision comes
// back through s.decisions, whichever goroutine makes it.
func (s *sess) askMFA(req *session.MFARequest) {
	f := s.d.cfg.Hooks.MFA
	if f == nil {
		// Fail closed: a driver without an MFA service never releases.
		s.decisions <- decision{o: mfa.Outcome{Code: mfa.SQLState, Message: "pgmfa is misconfigured: no MFA service"}}
		return
	}
	ch := s.decisions
	cancel, waiting := f(req, s.h.ID, s.h.Addr, func(p mfa.Path, o mfa.Outcome) {
		select {
		case ch <- decision{p, o}:
		default: // a second call breaks the hook's contract; ignore it
		}
	})
	if waiting {
		s.mfaWait = true
		s.setDeadline(time.Now().Add(s.d.cfg.MFATimeout))
		s.rec.Wait(req, cancel, "tls", s.m.Encrypted())
	}
}

// setDeadline moves the login's deadline: the timer and the write deadlines
// of both sockets (a peer that stops reading cannot hold the login past it).
func (s *sess) setDeadline(t time.Time) {
	s.deadline = t
	if s.timer != nil {
		s.timer.Reset(time.Until(t))
	}
	_ = s.client.SetWriteDeadline(t)
	if s.up != nil {
		_ = s.up.SetWriteDeadline(t)
	}
}
