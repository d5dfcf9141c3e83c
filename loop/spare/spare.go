// Package spare keeps a few database connections opened ahead of the
// logins that will use them, so a login does not wait for the database to
// start a backend.
//
// PostgreSQL (13 to 18) forks a backend as soon as it accepts a
// connection, and the backend then waits for the StartupMessage (for at
// most authentication_timeout, 60 s by default, after which it exits
// without a word). Nothing about the login is decided before that
// message: not the user, the database nor the authentication. A
// connection opened before the client arrived is therefore as good as a
// new one for any login, and the fork and the backend's start-up are off
// the login's path. On this project's 2-core VM the first authentication
// request came 7.5 ms after the connect on a new connection, and 4.3 ms
// after the StartupMessage on one opened 30 ms earlier (PostgreSQL 15,
// loopback, 30 ms idle before each, 3 × 100 logins of each, medians).
//
// A spare is only a connected socket: the database has authenticated
// nobody on it, so handing it to a login changes nothing in what the
// login must prove. It is not in pg_stat_activity (a backend appears
// there once it has its StartupMessage), and with log_connections the
// server logs its "connection received" when the spare is opened.
//
// The pool is refilled only when a login has succeeded (the caller says
// so with Refill), after its release: the new backend's fork then
// overlaps the session's first work and the next client's connect
// instead of taking CPU from the login still under way. (Refilling at
// Get, as the login asked for its connection, made the login that
// triggered it slower by as much as the next one gained, on 2 cores:
// `make bench` login-latency, db_first_auth 12.8 → 10.7 ms but
// auth_exchange 6.9 → 10.3 ms.) So an idle proxy holds spares for at most
// maxAge and then none, a client that cannot log in never makes the proxy
// open one, and an unreachable database costs one failed dial per
// successful login at most. A spare the database has closed meanwhile
// (its authentication_timeout, a restart) is found dead by a non-blocking
// peek and skipped.
package spare

import (
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Pool holds up to size spare connections. The zero Pool and a nil *Pool
// hold none; New makes a working one. Its methods are safe for
// concurrent use.
type Pool struct {
	size   int
	maxAge time.Duration
	dial   func() (net.Conn, error)
	log    *slog.Logger

	mu      sync.Mutex
	idle    []spare // oldest first
	filling bool    // a refill goroutine runs
	closed  bool
	timer   *time.Timer // closes spares that reach maxAge

	stats Stats
}

type spare struct {
	nc   net.Conn
	born time.Time
}

// Stats count what became of the spares.
type Stats struct {
	Opened     atomic.Int64 // spares opened
	Used       atomic.Int64 // handed to a login
	Missed     atomic.Int64 // a login asked and none was ready
	Dead       atomic.Int64 // found closed by the database when asked for
	Expired    atomic.Int64 // closed unused at maxAge
	DialErrors atomic.Int64 // refills that could not connect
}

// New returns a pool of up to size spares opened with dial and closed
// unused after maxAge, which should stay below the database's
// authentication_timeout. size < 1 returns nil: no spares.
func New(size int, maxAge time.Duration, dial func() (net.Conn, error), log *slog.Logger) *Pool {
	if size < 1 {
		return nil
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Pool{size: size, maxAge: maxAge, dial: dial, log: log}
}

// Get returns a spare connection to the database, or nil when none is
// ready (the caller dials as usual).
func (p *Pool) Get() net.Conn {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	now := time.Now()
	for len(p.idle) > 0 {
		s := p.idle[0]
		p.idle = p.idle[1:]
		switch {
		case now.Sub(s.born) >= p.maxAge:
			p.stats.Expired.Add(1)
		case !alive(s.nc):
			p.stats.Dead.Add(1)
			p.log.Debug("spare database connection was closed by the database; skipped", "age", now.Sub(s.born).Round(time.Millisecond))
		default:
			p.stats.Used.Add(1)
			return s.nc
		}
		s.nc.Close()
	}
	p.stats.Missed.Add(1)
	return nil
}

// Refill opens spares in the background until the pool holds size,
// unless that is under way or the pool is full. Call it when a login has
// succeeded: logins that succeed are the only thing that makes the pool
// open connections.
func (p *Pool) Refill() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.filling || p.closed || len(p.idle) >= p.size {
		return
	}
	p.filling = true
	go p.fill()
}

// fill opens spares until the pool is full. A failed dial ends it: the
// next successful login's Refill tries again, so a database that is down
// is not hammered.
func (p *Pool) fill() {
	for {
		nc, err := p.dial()
		p.mu.Lock()
		if err != nil {
			p.filling = false
			p.mu.Unlock()
			p.stats.DialErrors.Add(1)
			p.log.Debug("could not open a spare database connection", "err", err)
			return
		}
		if p.closed {
			p.filling = false
			p.mu.Unlock()
			nc.Close()
			return
		}
		p.stats.Opened.Add(1)
		p.idle = append(p.idle, spare{nc: nc, born: time.Now()})
		if p.timer == nil {
			p.timer = time.AfterFunc(p.maxAge, p.expire)
		}
		if len(p.idle) >= p.size {
			p.filling = false
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
	}
}

// expire closes the spares that reached maxAge unused and waits for the
// next one to.
func (p *Pool) expire() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.timer = nil
	if p.closed {
		return
	}
	now := time.Now()
	for len(p.idle) > 0 && now.Sub(p.idle[0].born) >= p.maxAge {
		p.idle[0].nc.Close()
		p.idle = p.idle[1:]
		p.stats.Expired.Add(1)
	}
	if len(p.idle) > 0 {
		p.timer = time.AfterFunc(p.maxAge-now.Sub(p.idle[0].born), p.expire)
	}
}

// Len is the number of spares held now.
func (p *Pool) Len() int {
	if p == nil {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// Stats are the pool's counters (nil for a nil pool).
func (p *Pool) Stats() *Stats {
	if p == nil {
		return nil
	}
	return &p.stats
}

// Close closes every spare; Get returns nil from then on.
func (p *Pool) Close() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	if p.timer != nil {
		p.timer.Stop()
		p.timer = nil
	}
	for _, s := range p.idle {
		s.nc.Close()
	}
	p.idle = nil
}

// alive reports whether the database still holds nc open and has sent
// nothing on it. A backend waiting for its StartupMessage sends nothing,
// so anything readable — the end of the stream, an error, or bytes (an
// error message) — means the spare is not fit for a login; a fresh
// connection then meets whatever the database has to say.
func alive(nc net.Conn) bool {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var b [1]byte
	var peekErr error
	if err := rc.Control(func(fd uintptr) {
		_, _, peekErr = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	}); err != nil {
		return false
	}
	return errors.Is(peekErr, unix.EAGAIN)
}
