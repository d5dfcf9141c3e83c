package login

import (
	"errors"
	"log/slog"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

// Record is what pgmfa knows and says about one client connection: its
// MFA outcome, its out-of-band wait, its one audit line and its one
// "session end" line. A driver keeps one per connection and calls it only
// from whatever drives that connection's login (the event loop, or the TLS
// driver's login goroutine); End may then be called once from the
// goroutine that ran the session.
//
// No line ever carries a code or a password: the login machine exposes
// neither, and the errors it returns carry none.
type Record struct {
	log     *slog.Logger
	id      uint64
	addr    string
	start   time.Time
	onLogin func(ok bool)
	obs     Observer // nil: none

	path   mfa.Path  // how MFA was decided (empty until it was)
	reason string    // the MFA outcome's reason, for a refused login's line
	logged bool      // the audit line was written
	cancel func()    // unregisters an out-of-band wait
	waited time.Time // when the out-of-band wait began; zero when none is open
	open   string    // the mode the observer counts this session open in ("": none)
}

// Observer is told what the proxy's metrics count: every audited login,
// every out-of-band wait, every handed-off session's life, and every
// session the kernel would not splice. It is called from whatever drives
// the connection — for the gnet driver, the event loop itself — so it must
// not block and should not allocate. Nothing handed to it names a user, an
// address, a code or a password.
type Observer interface {
	// Login: a login got its audit line; path is how MFA was decided ("":
	// it never was), reason the MFA outcome's reason ("" when none), d the
	// time from accept.
	Login(ok bool, path mfa.Path, reason string, d time.Duration)
	// MFAWaited: an out-of-band wait for `pgmfa approve` ended after d, as
	// result says (WaitApproved, WaitRefused, WaitTimedOut, WaitAbandoned).
	MFAWaited(result string, d time.Duration)
	// SessionOpened and SessionClosed bracket the time a handed-off session
	// is carried by mode (ModeSockmap, ModeRelay, ModeTLSRelay); a session
	// the kernel refused is closed as sockmap and opened again as relay.
	SessionOpened(mode string)
	SessionClosed(mode string)
	// SessionEnded: a handed-off session ended with st (its "session end"
	// line).
	SessionEnded(st Stats)
	// SpliceFallback: the kernel refused a session, which goes to the
	// user-space relay instead; err is Splice's error.
	SpliceFallback(err error)
}

// How an out-of-band wait ended, for Observer.MFAWaited.
const (
	WaitApproved  = "approved"  // released by an approval
	WaitRefused   = "refused"   // an approval refused it
	WaitTimedOut  = "timeout"   // nobody approved it within --mfa-timeout
	WaitAbandoned = "abandoned" // the login ended first (the client left, the proxy stopped)
)

// NewRecord starts the record of connection id from the client at addr
// (an unnamed unix-socket peer, "" or "@", is called "unix"). onLogin, if
// not nil, is told of every login that gets an audit line (the proxy's
// counters).
func NewRecord(log *slog.Logger, id uint64, addr string, onLogin func(ok bool)) *Record {
	if log == nil {
		log = slog.Default()
	}
	if addr == "" || addr == "@" {
		addr = "unix"
	}
	return &Record{log: log, id: id, addr: addr, start: time.Now(), onLogin: onLogin}
}

// Observe makes o (nil: none) the record's observer. Call it before the
// login starts.
func (r *Record) Observe(o Observer) { r.obs = o }

// Addr is the client's address, as the log and MFA throttling name it.
func (r *Record) Addr() string { return r.addr }

// Start is when the connection was accepted.
func (r *Record) Start() time.Time { return r.start }

// Decide records an MFA decision and hands it to the login machine; the
// caller performs the returned Output.
func (r *Record) Decide(m *session.Machine, path mfa.Path, o mfa.Outcome) session.Output {
	r.path, r.reason = path, o.Reason
	if !r.waited.IsZero() {
		res := WaitApproved
		if !o.OK {
			res = WaitRefused
		}
		r.endWait(res)
	}
	return m.MFADecided(Decision(o))
}

// Wait records that the login waits for `pgmfa approve` (cancel unregisters
// it) and says so in the log, with how to approve it. extra are the
// driver's own attributes.
func (r *Record) Wait(req *session.MFARequest, cancel func(), extra ...any) {
	r.cancel = cancel
	if r.obs != nil {
		r.waited = time.Now()
	}
	r.log.Info("login waiting for MFA approval", append([]any{"conn", r.id, "client", r.addr,
		"user", req.User, "approve_with", "pgmfa approve " + req.User + " CODE"}, extra...)...)
}

// TimedOut records that nobody approved the waiting login in time.
func (r *Record) TimedOut() {
	r.reason = mfa.ReasonTimeout
	r.endWait(WaitTimedOut)
}

// endWait tells the observer that the open out-of-band wait ended.
func (r *Record) endWait(result string) {
	if r.waited.IsZero() {
		return
	}
	r.obs.MFAWaited(result, time.Since(r.waited))
	r.waited = time.Time{}
}

// StopWaiting unregisters an out-of-band wait, if there is one. The login
// is over (decided, refused, or handed off): a late approval must find
// nothing to approve.
func (r *Record) StopWaiting() {
	if r.cancel != nil {
		r.cancel()
		r.cancel = nil
	}
	r.endWait(WaitAbandoned)
}

// Audit writes the one structured line per login, once: ok, or refused
// with the phase it got to, the MFA outcome and the error. A connection
// that never named a user (a port scan, a cancel request) gets no line.
// extra are the driver's own attributes (the TLS driver says which sides
// were encrypted). It reports whether it wrote the line.
func (r *Record) Audit(m *session.Machine, ok bool, err error, extra ...any) bool {
	var pe *proto.ProtocolError
	if !r.logged && m.User() == "" && errors.As(err, &pe) {
		// Refused before a StartupMessage named a user (a malformed
		// startup or cancel packet, e.g. a 3.2 CancelRequest of a wrong
		// length): PostgreSQL logs these too ("invalid length of startup
		// packet"), and without a line the refusal would be invisible.
		r.logged = true
		r.log.Warn("connection refused before login", append([]any{"conn", r.id, "client", r.addr, "error", err.Error()}, extra...)...)
		return true
	}
	if r.logged || m.User() == "" {
		return false
	}
	r.logged = true
	if r.onLogin != nil {
		r.onLogin(ok)
	}
	d := time.Since(r.start)
	if r.obs != nil {
		r.obs.Login(ok, r.path, r.reason, d)
	}
	attrs := append([]any{
		"conn", r.id, "client", r.addr, "user", m.User(), "database", m.Database(),
		"method", orDash(m.Method()), "mfa", orDash(string(r.path)),
		"duration", d.Round(time.Microsecond),
	}, extra...)
	if ok {
		r.log.Info("login", append(attrs, "result", "ok")...)
		return true
	}
	if r.reason != "" {
		attrs = append(attrs, "mfa_result", r.reason)
	}
	if err != nil {
		attrs = append(attrs, "error", err.Error())
	}
	r.log.Warn("login", append(attrs, "result", "refused", "phase", m.Reached().String())...)
	return true
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// How a handed-off session was carried, as its "session end" line says.
const (
	ModeSockmap  = "sockmap"   // spliced in the kernel
	ModeRelay    = "relay"     // the user-space relay (plaintext)
	ModeTLSRelay = "tls-relay" // the TLS driver's relay (either side encrypted)
)

// Stats describe a handed-off session when it ends, whichever path
// carried it.
type Stats struct {
	Mode string // ModeSockmap, ModeRelay or ModeTLSRelay
	// ClientToServer and ServerToClient count the bytes moved each way,
	// the bytes held at the handoff included.
	ClientToServer, ServerToClient uint64
	Duration                       time.Duration // from the handoff
	Reason                         string        // why it ended
	// Sockmap only (zero elsewhere): the times a direction entered flow
	// control, and the bytes flow control moved in user space.
	FlowControl, Relayed uint64
}

// Started says that the handed-off session is now carried by mode
// (ModeSockmap, ModeRelay or ModeTLSRelay). A driver calls it before it
// gives the sockets away, so that End (on another goroutine) finds it, and
// again when it moves the session to another mode (the kernel refused it).
func (r *Record) Started(mode string) {
	if r.obs == nil {
		return
	}
	if r.open != "" {
		r.obs.SessionClosed(r.open)
	}
	r.open = mode
	r.obs.SessionOpened(mode)
}

// HandedOver says that the session went to another process (pgmfa serve
// --takeover), which counts it from now on and writes its "session end"
// line: it is no longer open here.
func (r *Record) HandedOver() {
	if r.obs != nil && r.open != "" {
		r.obs.SessionClosed(r.open)
		r.open = ""
	}
}

// Fallback says that the kernel refused to splice the session (err is
// Splice's error); the driver gives it to the user-space relay next.
func (r *Record) Fallback(err error) {
	if r.obs != nil {
		r.obs.SpliceFallback(err)
	}
}

// End writes the one "session end" line of a handed-off session.
func (r *Record) End(m *session.Machine, st Stats) {
	r.EndOf(m.User(), m.Database(), st)
}

// EndOf is End for a session whose login ran elsewhere: one adopted from
// the process this one took over from (pgmfa serve --takeover), known by
// its user and database only.
func (r *Record) EndOf(user, database string, st Stats) {
	if r.obs != nil {
		if r.open != "" {
			r.obs.SessionClosed(r.open)
			r.open = ""
		}
		r.obs.SessionEnded(st)
	}
	r.log.Info("session end", "conn", r.id, "client", r.addr, "user", user, "database", database,
		"mode", st.Mode, "bytes_client_to_server", st.ClientToServer, "bytes_server_to_client", st.ServerToClient,
		"flow_control", st.FlowControl, "relayed_bytes", st.Relayed,
		"duration", st.Duration.Round(time.Millisecond), "reason", st.Reason)
}
