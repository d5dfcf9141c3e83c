package loop

import "github.com/pgmfa/pgmfa/proto/session"

// decidedInMemory reports whether ResolveMFA can decide req without store
// I/O: MFA off, an exempt user, or a login inside its --mfa-remember
// window. Those are in-memory checks (Guard.Remembered takes the guard's
// mutex, which Verify never holds across store I/O), so the decision is
// made on the event loop. Only a code that must be claimed in the store (a
// file lock, a read and a synced write) goes to another goroutine: that
// hop (a goroutine, a thread wake-up, then an eventfd back to the loop)
// cost ~0.15 ms per login on a quiet 2-core machine and more under load
// ("mfa" in the login timing line), on every login of a pool that sends
// its code each time.
func (s *Server) decidedInMemory(req *session.MFARequest, addr string) bool {
	cfg := s.cfg
	return !cfg.MFARequired || cfg.MFAExempt[req.User] || cfg.Guard.Remembered(req.User, addr)
}
