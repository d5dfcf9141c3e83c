package tlsproxy

import "sync"

// Session is a handle on one released (relayed) TLS session, safe for use
// from any goroutine: package loop lists and ends sessions through it.
type Session struct{ s *sess }

// Counts returns the plaintext bytes relayed so far each way (the bytes
// held at the release included).
func (h *Session) Counts() (clientToServer, serverToClient uint64) {
	return h.s.c2s.Load(), h.s.s2c.Load()
}

// End ends the session now: both sockets are closed and the session-end
// line says reason.
func (h *Session) End(reason string) { h.s.abort(reason) }

// RefuseLogins ends every login that has not been released yet with msg
// (a complete ErrorResponse, written over TLS when the client's side is
// encrypted) and refuses the logins that get that far later. A login in
// its startup phase (TLS handshake, StartupMessage) is closed when its
// goroutine next looks, or by Close. Released sessions are not touched.
func (d *Driver) RefuseLogins(msg []byte) {
	d.refuseOnce.Do(func() {
		d.refuseMsg = msg
		close(d.refusing)
	})
}

// refuseState is the Driver's part for RefuseLogins.
type refuseState struct {
	refuseOnce sync.Once
	refusing   chan struct{} // closed by RefuseLogins
	refuseMsg  []byte        // set before refusing is closed
}
