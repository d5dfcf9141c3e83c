package loop

import (
	"context"
	"log/slog"
	"time"
)

// The login timeline: when each step of one login happened, so that the
// time a login spends in the proxy can be told apart from the time it
// waits for the client or the database. It is written as one debug line
// per login ("login timing", --log-level debug); the benchmark suite reads
// those lines to break its login-latency figure down by step.
//
// Steps are stamped on the connection's event loop (the acceptor stamps
// the first one before the connection reaches the loop), so no locking is
// needed; a step that did not happen (a refused login) stays zero and is
// left out of the line. time.Now costs ~25 ns here (vDSO), a handful per
// login.

// loginStep is one moment of a login, in the order they happen.
type loginStep uint8

const (
	stepAccepted    loginStep = iota // the acceptor took the connection off the listen queue
	stepOpened                       // gnet opened it on an event loop (OnOpen)
	stepStartup                      // the StartupMessage is parsed; the database is dialed
	stepDialed                       // the database connection is open on the loop
	stepDBFirst                      // the database's first bytes (its first authentication request) arrived
	stepMFAAsked                     // the database's login is complete (held); MFA is asked
	stepMFADecided                   // the MFA decision is back on the loop
	stepReleaseSent                  // the release (AuthenticationOk … ReadyForQuery) is in the client's socket
	stepReleased                     // the sockets are in the kernel (or the relay)
	numLoginSteps
)

// timeline is one login's steps and the time the loop spent in its
// callbacks (parsing, relaying, deciding: the proxy's own work).
type timeline struct {
	at     [numLoginSteps]time.Time
	inLoop time.Duration
	spare  bool // the database connection was a spare: dial is only taking it
}

// mark stamps a step the first time it happens.
func (t *timeline) mark(s loginStep) {
	if t.at[s].IsZero() {
		t.at[s] = time.Now()
	}
}

// span is the time from step a to step b, and whether both happened in
// that order (with --auth accounts MFA is asked before the dial, so the
// spans that assume the other order are left out).
func (t *timeline) span(a, b loginStep) (time.Duration, bool) {
	if t.at[a].IsZero() || t.at[b].IsZero() || t.at[b].Before(t.at[a]) {
		return 0, false
	}
	return t.at[b].Sub(t.at[a]), true
}

// timingSpans are the spans of the "login timing" line: each names who the
// time belongs to. The spans up to release follow one another, so they add
// up to total, which ends when the client has its ReadyForQuery; splice,
// the sockets' move into the kernel, comes after it, off the client's path.
var timingSpans = []struct {
	key  string
	a, b loginStep
}{
	{"accept_to_loop", stepAccepted, stepOpened}, // proxy: hand-over from the acceptor to gnet
	{"client_startup", stepOpened, stepStartup},  // client: its StartupMessage (and SSLRequest)
	{"dial", stepStartup, stepDialed},            // proxy + kernel: connect to the database
	{"db_first_auth", stepDialed, stepDBFirst},   // database: backend start, first auth request
	{"auth_exchange", stepDBFirst, stepMFAAsked}, // client and database: the relayed round trips
	{"mfa", stepMFAAsked, stepMFADecided},        // proxy: the MFA decision (store I/O when a code is claimed)
	{"release", stepMFADecided, stepReleaseSent}, // proxy: the release written to the client
	{"total", stepAccepted, stepReleaseSent},     //
	{"splice", stepReleaseSent, stepReleased},    // proxy + kernel: dups, map inserts (the client already has its ReadyForQuery)
}

// logTiming writes the login's timeline at debug level.
func (c *conn) logTiming() {
	if !c.srv.log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	attrs := []any{"conn", c.id}
	for _, s := range timingSpans {
		if d, ok := c.tl.span(s.a, s.b); ok {
			attrs = append(attrs, s.key+"_us", d.Microseconds())
		}
	}
	attrs = append(attrs, "in_loop_us", c.tl.inLoop.Microseconds(), "spare", c.tl.spare)
	c.srv.log.Debug("login timing", attrs...)
}
