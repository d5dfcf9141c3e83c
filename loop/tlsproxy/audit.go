package tlsproxy

import (
	"time"

	"github.com/pgmfa/pgmfa/loop/login"
)

// audit writes the login's one audit line (package login: the same line as
// plaintext logins, so one log query covers both), saying also whether
// each side was encrypted.
func (s *sess) audit(ok bool, err error) {
	s.rec.Audit(s.m, ok, err, "tls", s.m.Encrypted(), "upstream_tls", isTLS(s.up))
}

// logEnd writes the "session end" line of a relayed session.
func (s *sess) logEnd() {
	s.rec.End(s.m, login.Stats{Mode: login.ModeTLSRelay, ClientToServer: s.c2s.Load(), ServerToClient: s.s2c.Load(),
		Duration: time.Since(s.relayStart), Reason: s.reason})
}
