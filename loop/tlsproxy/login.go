package tlsproxy

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/pgmfa/pgmfa/proto/session"
)

// closeGrace is how long the last words of a refused login (an
// ErrorResponse after a timeout) may take to write once the login's own
// deadline has passed.
const closeGrace = time.Second

var (
	errShutdown = errors.New("proxy shutting down")
	errRefused  = errors.New("proxy shutting down: the drain timeout passed before the login completed")
)

// login is the session's first goroutine and the only one that drives the
// machine. It returns at the release (the readers carry on as the relay)
// or when the login is refused.
func (s *sess) login() {
	defer func() {
		if s.timer != nil {
			s.timer.Stop()
		}
	}()
	// Up to the StartupMessage the (shorter) startup timeout, then the
	// rest of the handshake timeout.
	s.handshakeDeadline = s.start.Add(s.d.cfg.HandshakeTimeout)
	s.deadline = s.handshakeDeadline
	if st := s.d.cfg.StartupTimeout; st > 0 && s.start.Add(st).Before(s.deadline) {
		s.deadline = s.start.Add(st)
	}
	_ = s.h.Conn.SetDeadline(s.deadline)

	if len(s.h.Reply) > 0 {
		if _, err := s.h.Conn.Write(s.h.Reply); err != nil {
			s.close(fmt.Errorf("write to client: %w", err))
			return
		}
	}
	if s.h.StartTLS {
		if !s.handshake(s.h.ReadAhead, s.h.Direct) {
			return
		}
	} else {
		s.cbuf = append([]byte(nil), s.h.ReadAhead...)
	}
	if !s.startup() {
		return
	}
	s.endStartup()
	// From here on both sides may speak at any time: a reader per socket
	// feeds this goroutine, which waits for whatever comes first.
	client := s.client
	_ = client.SetReadDeadline(time.Time{})
	s.spawn(func() { s.pump(client, s.cin, true) })
	s.timer = time.NewTimer(time.Until(s.deadline))
	for !s.closed && !s.established {
		select {
		case c := <-s.cin:
			s.cbuf = append(s.cbuf, c.data...)
			s.drain()
			if c.err != nil && !s.closed && !s.established {
				s.act(s.m.ClientClosed())
				s.close(fmt.Errorf("client: %w", c.err)) // in case the machine had nothing to say
			}
		case u := <-s.uin:
			s.ubuf = append(s.ubuf, u.data...)
			s.drain()
			if u.err != nil && !s.closed && !s.established {
				err := u.err
				if errors.Is(err, io.EOF) {
					err = nil
				}
				s.act(s.m.UpstreamClosed(err))
			}
		case dd := <-s.decisions:
			s.act(s.rec.Decide(s.m, dd.path, dd.o))
			s.drain()
		case <-s.timer.C:
			if s.mfaWait {
				s.rec.TimedOut()
			}
			s.setDeadline(time.Now().Add(closeGrace))
			s.act(s.m.Timeout(s.mfaWait))
			s.close(errors.New("login did not complete in time")) // in case the machine had nothing to say
		case <-s.d.ctx.Done():
			s.close(errShutdown)
		case <-s.d.refusing:
			s.setDeadline(time.Now().Add(closeGrace))
			if s.clientErr == nil {
				_, _ = s.client.Write(s.d.refuseMsg)
			}
			s.close(errRefused)
		}
	}
}

// startup runs the startup phase (SSLRequest, the TLS handshake,
// GSSENCRequest, CancelRequest, StartupMessage). Only the client speaks
// then, so it is read here directly, under the handshake deadline. It
// reports whether the login goes on.
func (s *sess) startup() bool {
	buf := make([]byte, 8192)
	for !s.closed && s.m.Phase() == session.PhaseStartup {
		if len(s.cbuf) > 0 {
			n, out := s.m.FromClient(s.cbuf)
			s.cbuf = s.cbuf[n:]
			s.act(out)
			if n > 0 || out.StartTLS {
				continue
			}
			if s.closed {
				break
			}
		}
		n, err := s.client.Read(buf)
		s.cbuf = append(s.cbuf, buf[:n]...)
		if err != nil && n == 0 {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				s.setDeadline(time.Now().Add(closeGrace))
				s.act(s.m.Timeout(false))
			} else {
				s.act(s.m.ClientClosed())
			}
			s.close(fmt.Errorf("client: %w", err))
		}
	}
	return !s.closed && !s.established
}

// endStartup moves the deadline from the startup timeout to the rest of the
// handshake timeout, once the StartupMessage is in.
func (s *sess) endStartup() {
	if s.deadline.Before(s.handshakeDeadline) && !s.mfaWait {
		s.setDeadline(s.handshakeDeadline)
	}
}

// drain feeds buffered bytes of both sides to the machine until it makes no
// more progress. Both sides every time: a step on one side can make the
// machine ready for bytes the other side sent earlier. The machine sees
// every unparsed byte of a side, and bounds them
// (session.Config.MaxPipelined, MaxFromUpstream).
func (s *sess) drain() {
	for !s.closed && !s.established {
		progress := false
		if len(s.cbuf) > 0 {
			n, out := s.m.FromClient(s.cbuf)
			s.cbuf = s.cbuf[n:]
			s.act(out)
			progress = n > 0
		}
		if s.closed || s.established {
			return
		}
		if len(s.ubuf) > 0 {
			n, out := s.m.FromUpstream(s.ubuf)
			s.ubuf = s.ubuf[n:]
			s.act(out)
			progress = progress || n > 0
		}
		if !progress {
			break
		}
	}
}
