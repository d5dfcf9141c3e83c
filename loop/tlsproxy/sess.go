package tlsproxy

import (
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

// sess is one connection run by the driver: its login, then its relay.
//
// Ownership: the login goroutine alone touches the machine and every field
// below "login goroutine only". The reader goroutines touch only their
// channels until relay is closed; from then on they own their direction.
// Fields under mu are shared with Driver.Close.
type sess struct {
	d     *Driver
	h     Handoff
	done  func()
	m     *session.Machine
	rec   *login.Record // the MFA outcome and wait, the audit and session-end lines
	start time.Time

	live  atomic.Int32  // goroutines of this session still running
	quit  chan struct{} // closed when the login is given up
	relay chan struct{} // closed at the release: the readers become the relay

	mu      sync.Mutex
	aborted bool
	rawUp   net.Conn // the database socket, once dialed

	// login goroutine only (and, after relay is closed, read-only)
	client, up  net.Conn // client: the TLS conn once encrypted
	cin, uin    chan chunk
	decisions   chan decision
	cbuf, ubuf  []byte
	deadline    time.Time
	timer       *time.Timer
	mfaWait     bool
	closed      bool
	established bool
	clientErr   error // a write to the client failed
	upErr       error // a write to the database failed

	// login goroutine only: the bounds of the login
	handshakeDeadline time.Time // deadline is earlier until the StartupMessage is in

	// the relayed session
	est          *session.Established
	removeCancel func()
	unlist       func() // from Hooks.Established
	relayStart   time.Time
	c2s, s2c     atomic.Uint64
	reasonOnce   sync.Once
	reason       string
}

// chunk is one read from a socket, handed to the login goroutine.
type chunk struct {
	data []byte
	err  error
}

type decision struct {
	path mfa.Path
	o    mfa.Outcome
}

func newSess(d *Driver, h Handoff, done func()) *sess {
	rec := login.NewRecord(d.log, h.ID, h.Addr, d.cfg.Hooks.LoginDone)
	rec.Observe(d.cfg.Hooks.Observer)
	h.Addr = rec.Addr()
	return &sess{
		d:         d,
		h:         h,
		done:      done,
		m:         session.New(d.cfg.Session),
		rec:       rec,
		start:     rec.Start(),
		quit:      make(chan struct{}),
		relay:     make(chan struct{}),
		client:    h.Conn,
		cin:       make(chan chunk),
		uin:       make(chan chunk),
		decisions: make(chan decision, 1),
	}
}

// spawn runs f on a goroutine of this session; the last one to return
// finishes the session.
func (s *sess) spawn(f func()) {
	s.live.Add(1)
	go func() {
		f()
		if s.live.Add(-1) == 0 {
			s.finish()
		}
	}()
}

// setUpstream records the database connection so that abort can close it;
// false when the session was aborted meanwhile (the conn is then closed).
func (s *sess) setUpstream(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.aborted {
		_ = c.Close()
		return false
	}
	s.rawUp = rawConn(c)
	return true
}

// abort closes both sockets at once, from any goroutine: every blocked
// read and write of the session returns, and its goroutines wind down.
func (s *sess) abort(reason string) {
	if reason != "" {
		s.setReason(reason)
	}
	s.mu.Lock()
	s.aborted = true
	up := s.rawUp
	s.mu.Unlock()
	_ = s.h.Conn.Close()
	if up != nil {
		_ = up.Close()
	}
}

func (s *sess) setReason(r string) {
	s.reasonOnce.Do(func() { s.reason = r })
}

// finish runs once, on the session's last goroutine.
func (s *sess) finish() {
	s.abort("finished")
	if s.est != nil {
		if s.removeCancel != nil {
			s.removeCancel()
		}
		if s.unlist != nil {
			s.unlist()
		}
		s.logEnd()
		if f := s.d.cfg.Hooks.SessionDone; f != nil {
			f()
		}
	}
	if s.done != nil {
		s.done()
	}
	s.d.forget(s)
}
