package loop

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/panjf2000/gnet/v2"
	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/proto"
)

// Accepting connections.
//
// pgmfa accepts clients itself and hands each accepted socket to gnet with
// Engine.Register, instead of letting gnet listen. The reason is gnet
// v2.10.0's acceptor (acceptor_unix.go, accept0): any accept(2) error other
// than EINTR, EAGAIN, ECONNRESET and ECONNABORTED returns ErrAcceptSocket,
// the main reactor's poll loop returns it (reactor_default.go, rotate), and
// the engine shuts down — with gnet.Rotate then returning nil. So one EMFILE
// (a flood of idle connections, or a traffic spike, past the open-file
// limit) stopped the proxy for good, and every spliced session with it.
//
// The alternatives were weaker. A --max-conns derived from the open-file
// limit keeps EMFILE rare but not impossible (descriptors are also taken by
// dials, handoff dups, TLS, the admin API, cancel forwards), and does
// nothing for ENFILE, ENOBUFS or ENOMEM, which are system-wide: another
// process can cause them. A reserve descriptor closed and reopened around
// accept needs the accept call in our hands anyway. So: an accept loop per
// listener (Go's net.Listener) that logs an error at most once per
// interval, backs off (5 ms doubling to 1 s, as net/http does) and keeps
// going; at EMFILE/ENFILE it first spends a reserve descriptor to take one
// waiting connection off the queue and answer it 53300, so clients hear
// "try again" instead of hanging in the backlog. --max-conns (by default
// derived from the open-file limit, see DefaultMaxConns) refuses the
// connections over it the same way, before they cost gnet anything.
//
// gnet still needs one listener of its own: Engine.Register and Engine.Stop
// refuse an engine without one (Engine.Validate). It gets a unix socket in
// a private directory whose path is removed as soon as the engine boots: no
// one can ever connect to it, so gnet's acceptor never runs.

// acceptInFlight bounds the accepted connections on their way into gnet
// (each holds two descriptors for a moment: Go's and gnet's duplicate).
const acceptInFlight = 32

// fdsPerConn is the most descriptors one client connection holds at once:
// its socket and the database's, and a third for a moment while the
// database is dialed (gnet dials with net.Dial and registers a duplicate
// before closing the original). A spliced or relayed session holds two, a
// TLS connection two (plus one for a moment at the handoff), a half-closed
// client's duplicate replaces its gnet conn. The handoff duplicates both
// sockets before closing the gnet conns, within one callback: that is at
// most one session per event loop at a time, counted in fdReserve.
const fdsPerConn = 3

// fdReserve is what DefaultMaxConns keeps free for everything that is not
// a client connection: stdio, the runtime's poller, the listeners, the BPF
// objects and the splicer's watcher, the store and log files, the admin API
// and its connections, cancel forwards (96 in all); per event loop its
// epoll, eventfd and a handoff's two duplicates; per relay worker its epoll
// and eventfd; and the connections on their way into gnet.
func fdReserve(loops int) int {
	if loops <= 0 {
		loops = runtime.NumCPU()
	}
	return 96 + 4*loops + 2*runtime.GOMAXPROCS(0) + 2*acceptInFlight
}

// DefaultMaxConns is the --max-conns that keeps the proxy within its
// open-file limit (RLIMIT_NOFILE, which the Go runtime raises to the hard
// limit at start): (limit - fdReserve) / fdsPerConn, at least 1. It also
// returns the limit.
func DefaultMaxConns(loops int) (int, uint64) {
	var rl unix.Rlimit
	limit := uint64(1 << 20)
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil && rl.Cur != unix.RLIM_INFINITY && rl.Cur < limit {
		limit = rl.Cur
	}
	n := (int(limit) - fdReserve(loops)) / fdsPerConn
	if n < 1 {
		n = 1
	}
	return n, limit
}

// pendingClient is the gnet context of an accepted connection until its
// OnOpen. Its state says who owns the connection's --max-conns slot: gnet's
// OnOpen (opened), or nobody because gnet never opened it (abandoned; the
// acceptor gave the slot back). accepted starts the login's timeline.
type pendingClient struct {
	state    atomic.Int32
	accepted time.Time
}

const (
	pendingWaiting int32 = iota
	pendingOpened
	pendingAbandoned
)

// open claims the slot for OnOpen; false means the acceptor already gave
// it back and the connection must be closed.
func (pc *pendingClient) open() bool {
	return pc.state.CompareAndSwap(pendingWaiting, pendingOpened)
}

// acceptor runs the accept loops.
type acceptor struct {
	s    *Server
	lns  []net.Listener
	quit chan struct{}
	wg   sync.WaitGroup

	inflight chan struct{}
	regMu    sync.Mutex // gnet's round-robin balancer is not safe for concurrent use

	reserveMu sync.Mutex
	reserve   int // a descriptor held for shedding at EMFILE; -1 when none

	stop   chan struct{} // closed by close: registrations under way are abandoned (not by pause)
	mu     sync.Mutex    // lns, quit, paused, closed: pause and resume (takeover.go)
	paused bool          // the accept loops are stopped, for now or (closed) for good
	closed bool

	errLog, refusedLog    everyLog
	tooMany, outOfFDReply []byte
}

// listen opens the listeners (gnet-style addresses from listenAddrs).
func (s *Server) listen() ([]net.Listener, error) {
	lc := net.ListenConfig{
		// gnet did not enable keep-alive on accepted sockets; neither do we.
		KeepAlive: -1,
		Control: func(network, _ string, rc syscall.RawConn) error {
			if s.cfg.ReusePort && network != "unix" {
				// Before bind: several processes share the address and the
				// kernel spreads connections over them (--reuse-port).
				var rerr error
				if err := rc.Control(func(fd uintptr) {
					rerr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
				}); err != nil {
					return err
				}
				if rerr != nil {
					return fmt.Errorf("SO_REUSEPORT: %w", rerr)
				}
			}
			b := s.cfg.SocketBuf
			if b <= 0 || network == "unix" {
				return nil
			}
			// Set on the listener so accepted sockets inherit it before
			// their handshake (window scaling), as gnet did.
			var serr error
			err := rc.Control(func(fd uintptr) {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, b); serr == nil {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, b)
				}
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
	var lns []net.Listener
	for _, a := range s.addrs {
		network, addr, _ := strings.Cut(a, "://")
		ln, err := lc.Listen(context.Background(), network, addr)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("--listen %s: %w", addr, err)
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

func newAcceptor(s *Server, lns []net.Listener) *acceptor {
	a := &acceptor{
		s: s, lns: lns, quit: make(chan struct{}), stop: make(chan struct{}), inflight: make(chan struct{}, acceptInFlight), reserve: -1,
		errLog: everyLog{every: 10 * time.Second}, refusedLog: everyLog{every: 10 * time.Second},
		tooMany: proto.Append(nil, proto.Fatal(proto.CodeTooManyConnections, "sorry, too many clients already",
			"pgmfa's --max-conns limit is reached; try again later")),
		outOfFDReply: proto.Append(nil, proto.Fatal(proto.CodeTooManyConnections, "sorry, too many clients already",
			"pgmfa has no file descriptor left; try again later (if this persists, raise its open-file limit or lower --max-conns)")),
	}
	a.openReserve()
	return a
}

// start runs one accept loop per listener.
func (a *acceptor) start() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, ln := range a.lns {
		a.wg.Add(1)
		go a.run(ln, a.quit)
	}
}

// pause stops accepting for now: it closes the listeners (a takeover holds
// duplicates of their fds, so their sockets and accept queues live on) and
// waits for the loops. Connections accepted before it may still be on
// their way into gnet (at most acceptInFlight).
func (a *acceptor) pause() {
	a.mu.Lock()
	if !a.paused {
		a.paused = true
		close(a.quit)
		for _, ln := range a.lns {
			ln.Close()
		}
	}
	a.mu.Unlock()
	a.wg.Wait()
}

// resume accepts on lns again after a pause, unless the acceptor was
// closed meanwhile (then it closes lns and reports false).
func (a *acceptor) resume(lns []net.Listener) bool {
	a.mu.Lock()
	if a.closed || !a.paused {
		a.mu.Unlock()
		for _, ln := range lns {
			ln.Close()
		}
		return false
	}
	a.lns, a.quit, a.paused = lns, make(chan struct{}), false
	a.mu.Unlock()
	a.start()
	return true
}

// close stops accepting for good: it closes the listeners and waits for
// the loops.
func (a *acceptor) close() {
	a.mu.Lock()
	if !a.closed {
		a.closed = true
		close(a.stop)
	}
	a.mu.Unlock()
	a.pause()
	a.reserveMu.Lock()
	if a.reserve >= 0 {
		unix.Close(a.reserve)
		a.reserve = -1
	}
	a.reserveMu.Unlock()
}

func (a *acceptor) run(ln net.Listener, quit chan struct{}) {
	defer a.wg.Done()
	var delay time.Duration
	for {
		select {
		case a.inflight <- struct{}{}:
		case <-quit:
			return
		}
		nc, err := ln.Accept()
		if err == nil {
			delay = 0
			a.admit(nc)
			continue
		}
		<-a.inflight
		if errors.Is(err, net.ErrClosed) {
			return
		}
		// Never fatal: log (at most once per interval), take one waiting
		// connection off the queue with a 53300 when descriptors are out,
		// back off, retry.
		a.s.stats.AcceptErrors.Add(1)
		shed := a.shed(ln, err)
		if delay == 0 {
			delay = 5 * time.Millisecond
		} else if delay *= 2; delay > time.Second {
			delay = time.Second
		}
		if n, ok := a.errLog.tick(); ok {
			a.s.log.Error("accepting a connection failed; backing off and retrying", "listen", ln.Addr().String(),
				"err", err.Error(), "backoff", delay, "errors_since_last_report", n)
		}
		if shed {
			continue // a connection was taken off the queue: look for the next at once
		}
		select {
		case <-time.After(delay):
		case <-quit:
			return
		}
	}
}

// admit counts an accepted connection against --max-conns and registers it
// with gnet, or refuses it.
func (a *acceptor) admit(nc net.Conn) {
	s := a.s
	s.stats.Accepted.Add(1)
	if s.conns.Add(1) > int64(s.cfg.MaxConns) {
		s.conns.Add(-1)
		s.stats.Refused.Add(1)
		refuseConn(nc, a.tooMany)
		nc.Close()
		<-a.inflight
		if n, ok := a.refusedLog.tick(); ok {
			s.log.Warn("connection refused: --max-conns reached", "client", nc.RemoteAddr().String(),
				"max_conns", s.cfg.MaxConns, "refused_since_last_report", n)
		}
		return
	}
	pc := &pendingClient{accepted: time.Now()}
	ctx := gnet.NewNetConnContext(gnet.NewContext(context.Background(), pc), nc)
	a.regMu.Lock()
	ch, err := s.eng.Register(ctx)
	a.regMu.Unlock()
	if err != nil {
		nc.Close()
		s.conns.Add(-1)
		<-a.inflight
		s.log.Debug("accepted connection not registered with the event loop", "err", err)
		return
	}
	go func() {
		// gnet duplicates the socket, closes Go's copy and opens the
		// duplicate on a loop; a failure on the way (or an engine shutting
		// down) leaves OnOpen uncalled, and the slot unused.
		var r gnet.RegisteredResult
		select {
		case r = <-ch:
		case <-a.stop:
		}
		if pc.state.CompareAndSwap(pendingWaiting, pendingAbandoned) {
			s.conns.Add(-1)
			if errors.Is(r.Err, syscall.EMFILE) || errors.Is(r.Err, syscall.ENFILE) {
				// gnet could not duplicate the socket. It closes its copy
				// after this result; if it has not yet, the client hears why.
				s.stats.Refused.Add(1)
				refuseConn(nc, a.outOfFDReply)
			}
		}
		<-a.inflight
	}()
}

// shed handles EMFILE/ENFILE: it closes the reserve descriptor, accepts one
// waiting connection with it, answers 53300, closes it and reopens the
// reserve. It reports whether a connection was shed.
func (a *acceptor) shed(ln net.Listener, err error) bool {
	if !errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.ENFILE) {
		return false
	}
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return false
	}
	rc, rerr := sc.SyscallConn()
	if rerr != nil {
		return false
	}
	a.reserveMu.Lock()
	defer a.reserveMu.Unlock()
	if a.reserve < 0 {
		a.openReserve()
		return false
	}
	unix.Close(a.reserve)
	a.reserve = -1
	nfd := -1
	_ = rc.Read(func(fd uintptr) bool {
		// One non-blocking attempt: nothing waiting is EAGAIN.
		nfd, _, _ = unix.Accept4(int(fd), unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		return true
	})
	if nfd >= 0 {
		refuse(nfd, a.outOfFDReply)
		unix.Close(nfd)
		a.s.stats.Refused.Add(1)
	}
	a.openReserve()
	return nfd >= 0
}

// openReserve opens the reserve descriptor (the caller holds reserveMu, or
// no one else can see the acceptor yet).
func (a *acceptor) openReserve() {
	if fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
		a.reserve = fd
	}
}

// refuseConn refuses an accepted net.Conn (see refuse); the caller closes it.
func refuseConn(nc net.Conn, msg []byte) {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) { refuse(int(fd), msg) })
}

// refuse writes msg to a fresh non-blocking socket (it fits in the empty
// send buffer), ends the stream (FIN) and reads away what the client has
// sent already (its StartupMessage, typically). The caller closes the
// socket at once: closing one with unread bytes would send a reset instead
// of a FIN, and a reset can throw the refusal away before the client reads
// it (the client would see "connection reset", not "too many clients").
func refuse(fd int, msg []byte) {
	_, _ = unix.Write(fd, msg)
	_ = unix.Shutdown(fd, unix.SHUT_WR)
	var buf [4096]byte
	for i := 0; i < 4; i++ {
		if n, err := unix.Read(fd, buf[:]); n <= 0 || err != nil {
			return
		}
	}
}

// everyLog lets a repeated event through to the log at most once per
// interval, counting the ones in between.
type everyLog struct {
	every time.Duration
	mu    sync.Mutex
	last  time.Time
	n     int64
}

// tick records an event; ok says whether to log it now, n how many were
// not logged since the last one.
func (e *everyLog) tick() (n int64, ok bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := time.Now()
	if !e.last.IsZero() && now.Sub(e.last) < e.every {
		e.n++
		return 0, false
	}
	n, e.n, e.last = e.n, 0, now
	return n, true
}
