package tlsproxy

import (
	"fmt"

	"github.com/pgmfa/pgmfa/proto/session"
)

// act performs one Output of the machine, in the order Output documents.
func (s *sess) act(out session.Output) {
	if s.closed || s.established {
		return
	}
	if len(out.ToUpstream) > 0 && s.up != nil && s.upErr == nil {
		if _, err := s.up.Write(out.ToUpstream); err != nil {
			s.upErr = err
		}
	}
	if out.Established != nil {
		s.establish(out)
		return
	}
	if len(out.ToClient) > 0 && s.clientErr == nil {
		if _, err := s.client.Write(out.ToClient); err != nil {
			s.clientErr = err
		}
	}
	if out.StartTLS && s.clientErr == nil {
		prefix := s.cbuf
		s.cbuf = nil
		if !s.handshake(prefix, out.DirectTLS) {
			return
		}
	}
	if out.Dial {
		s.dial()
	}
	if out.Cancel != nil {
		s.forwardCancel(out.Cancel)
	}
	if out.NeedMFA != nil && !s.closed {
		s.askMFA(out.NeedMFA)
	}
	if out.Close {
		err := out.Err
		if err == nil && s.clientErr != nil {
			err = s.clientErr
		}
		s.close(err)
		return
	}
	if !s.closed && (s.clientErr != nil || s.upErr != nil) {
		s.writeFailed()
	}
}

// writeFailed ends a login whose client or database went away under a
// write: the machine's last words go to whichever side is still there.
func (s *sess) writeFailed() {
	var out session.Output
	err := s.clientErr
	if err != nil {
		out = s.m.ClientClosed()
		err = fmt.Errorf("write to client: %w", err)
	} else {
		out = s.m.UpstreamClosed(s.upErr)
		err = fmt.Errorf("write to the database: %w", s.upErr)
	}
	if len(out.ToUpstream) > 0 && s.up != nil && s.upErr == nil {
		_, _ = s.up.Write(out.ToUpstream)
	}
	if len(out.ToClient) > 0 && s.clientErr == nil {
		_, _ = s.client.Write(out.ToClient)
	}
	s.close(err)
}
