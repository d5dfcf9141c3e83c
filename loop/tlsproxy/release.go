package tlsproxy

import (
	"fmt"
	"time"

	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/proto/session"
)

// establish hands the released session to the relay: the cancel key is
// registered first (the client may use it as soon as it has it), then the
// release and anything the database said after its ReadyForQuery go to the
// client, client bytes pipelined behind the login go to the database, and
// the readers take over.
func (s *sess) establish(out session.Output) {
	est := out.Established
	if f := s.d.cfg.Hooks.RegisterCancel; f != nil {
		s.removeCancel = f(est.Key, s.h.ID)
	}
	toClient := append(out.ToClient, s.ubuf...)
	toServer := s.cbuf
	s.ubuf, s.cbuf = nil, nil
	if s.upErr != nil {
		s.releaseFailed(fmt.Errorf("write to the database: %w", s.upErr))
		return
	}
	if _, err := s.client.Write(toClient); err != nil {
		s.releaseFailed(fmt.Errorf("write to client: %w", err))
		return
	}
	if len(toServer) > 0 {
		if _, err := s.up.Write(toServer); err != nil {
			s.releaseFailed(fmt.Errorf("write to the database: %w", err))
			return
		}
	}
	// Counted like the relay's own bytes, as package loop's relays do.
	s.s2c.Add(uint64(len(toClient)))
	s.c2s.Add(uint64(len(toServer)))
	_ = s.client.SetDeadline(time.Time{})
	_ = s.up.SetDeadline(time.Time{})
	s.stopWaiting()
	s.audit(true, nil)
	s.established = true
	s.est = est
	s.relayStart = time.Now()
	s.rec.Started(login.ModeTLSRelay)
	if f := s.d.cfg.Hooks.Established; f != nil {
		s.unlist = f(s.h.ID, s.m.User(), s.m.Database(), s.h.Addr, est.Key, &Session{s})
	}
	close(s.relay)
}

func (s *sess) releaseFailed(err error) {
	if s.removeCancel != nil {
		s.removeCancel()
		s.removeCancel = nil
	}
	s.close(err)
}

// close ends a login that did not make it to the release.
func (s *sess) close(err error) {
	if s.closed {
		return
	}
	s.closed = true
	s.stopWaiting()
	s.audit(false, err)
	close(s.quit)
	// tls.Conn.Close sends close_notify (bounded by its own short write
	// deadline); abort then closes the sockets whatever state they are in.
	_ = s.client.Close()
	if s.up != nil {
		_ = s.up.Close()
	}
	s.abort("login refused")
}

func (s *sess) stopWaiting() {
	if s.timer != nil {
		s.timer.Stop()
	}
	s.rec.StopWaiting()
}
