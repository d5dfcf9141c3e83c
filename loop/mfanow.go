package loop

import (
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

// decideInMemory decides an MFA request that needs no store I/O: MFA off,
// an exempt user, or a login inside its --mfa-remember window (the first
// two cases of ResolveMFA, in its order). Those are in-memory checks
// (Guard.Remembered takes the guard's mutex, which Verify never holds
// across store I/O), so a login that sends a code anyway — a pool that
// puts it in every connection string — is decided on the event loop. Only
// a code that must be claimed in the store (a file lock, a read and a
// synced write) goes to another goroutine: that hop (a goroutine, a
// thread wake-up, then the loop's eventfd) cost ~0.16–0.18 ms per login on
// a busy 2-core machine ("mfa" in the login timing line; README,
// "Logins, step by step"). The decision is returned rather than re-checked
// by ResolveMFA, so a window that ends in between cannot send the code to
// the store from the loop.
func (s *Server) decideInMemory(req *session.MFARequest, addr string) (mfa.Path, mfa.Outcome, bool) {
	cfg := s.cfg
	switch {
	case !cfg.MFARequired || cfg.MFAExempt[req.User]:
		return mfa.PathExempt, mfa.Outcome{OK: true}, true
	case cfg.Guard.Remembered(req.User, addr):
		return mfa.PathRemembered, mfa.Outcome{OK: true}, true
	}
	return "", mfa.Outcome{}, false
}
