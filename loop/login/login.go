// Package login is the login policy that pgmfa's two drivers share: the
// gnet loop (package loop), which must never block, and the TLS driver
// (package loop/tlsproxy), which runs crypto/tls on goroutines of its own.
//
// The drivers differ only in how bytes move and how a wait is scheduled;
// what a login decides and what pgmfa says about it is here, once:
//
//   - the defaults that bound a login (Timeouts) and a forwarded cancel;
//   - the MFA Gate: exempt, remembered, a code verified now, or a wait for
//     `pgmfa approve`;
//   - the Record of one connection: the MFA outcome turned into the login
//     machine's decision, the "waiting for approval" line, the one audit
//     line per login, and the one "session end" line per handed-off
//     session, in the same shape whichever driver and handoff ran it (so
//     one log query covers every path).
//
// The byte limits of a login are rules of the login machine itself
// (package proto/session), not of this package.
package login

import "time"

// Defaults of the bounds of a login, for the zero values of Timeouts (and
// the flag defaults of `pgmfa serve`).
const (
	// DefaultStartupTimeout bounds the time from accept to the
	// StartupMessage (a TLS handshake included).
	DefaultStartupTimeout = 5 * time.Second
	// DefaultHandshakeTimeout bounds the whole login up to the MFA wait.
	DefaultHandshakeTimeout = 15 * time.Second
	// DefaultMFATimeout bounds the wait for an out-of-band approval.
	DefaultMFATimeout = 60 * time.Second
)

// CancelTimeout bounds a forwarded CancelRequest: connecting to the
// database, and waiting for it to close that connection once it has
// signalled the backend (libpq waits for that close too).
const CancelTimeout = 5 * time.Second

// Timeouts are the time bounds of one login.
type Timeouts struct {
	// Startup bounds accept to StartupMessage; never longer than Handshake.
	Startup time.Duration
	// Handshake bounds the whole login up to the MFA wait.
	Handshake time.Duration
	// MFA bounds the wait for an out-of-band approval.
	MFA time.Duration
}

// WithDefaults fills zero (or negative) bounds with the defaults and caps
// Startup at Handshake: a connection that says nothing is never kept
// longer than a whole login may take.
func (t Timeouts) WithDefaults() Timeouts {
	if t.Handshake <= 0 {
		t.Handshake = DefaultHandshakeTimeout
	}
	if t.MFA <= 0 {
		t.MFA = DefaultMFATimeout
	}
	if t.Startup <= 0 {
		t.Startup = DefaultStartupTimeout
	}
	t.Startup = min(t.Startup, t.Handshake)
	return t
}
