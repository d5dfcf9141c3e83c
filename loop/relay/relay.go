// Package relay forwards bytes between the two sockets of an authenticated
// session in user space, for sessions the kernel cannot splice (no BPF
// rights, an insertion that failed, --splice off).
//
// It is an epoll relay with a fixed number of worker goroutines, not a
// goroutine per connection, and it is bounded: each direction of a session
// holds at most one buffer (BufferSize bytes, plus the read-ahead handed
// over at the start). When the destination does not drain, the relay stops
// reading the source, the source's socket buffer fills and TCP flow control
// pushes back on the sender — so a client reading a 1 GB result slowly
// costs the proxy one buffer, not 1 GB. Buffers come from a pool and go
// back to it whenever a direction is drained, so idle sessions hold none.
//
// gnet has no way to stop reading a connection, which is why the relay takes
// the sockets over (the same dup-and-close handoff as the kernel path)
// instead of running inside the gnet loop.
package relay

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bpf/epoll"
)

// Options configure a Relay.
type Options struct {
	// BufferSize is the most a direction holds in user space. Zero:
	// DefaultBufferSize.
	BufferSize int
	// Workers is the number of epoll goroutines. Zero: GOMAXPROCS.
	Workers int
	Logger  *slog.Logger
}

// DefaultBufferSize is the most a direction holds in user space unless
// Options.BufferSize says otherwise.
const DefaultBufferSize = 64 << 10

// Stats describe a finished session.
type Stats struct {
	ClientToServer, ServerToClient uint64
	Duration                       time.Duration
	Reason                         string
}

// Relay moves bytes between socket pairs.
type Relay struct {
	opts    Options
	pool    sync.Pool
	workers []*worker
	next    atomic.Uint32
	live    atomic.Int64
	closed  atomic.Bool
}

// ErrClosed is returned by Add after Close.
var ErrClosed = errors.New("relay: closed")

// New starts the workers.
func New(opts Options) (*Relay, error) {
	if opts.BufferSize <= 0 {
		opts.BufferSize = DefaultBufferSize
	}
	if opts.Workers <= 0 {
		opts.Workers = runtime.GOMAXPROCS(0)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	r := &Relay{opts: opts}
	r.pool.New = func() any { b := make([]byte, opts.BufferSize); return &b }
	for i := 0; i < opts.Workers; i++ {
		w, err := newWorker(r)
		if err != nil {
			r.Close()
			return nil, err
		}
		r.workers = append(r.workers, w)
		go w.run()
	}
	return r, nil
}

// Sessions is the number of live sessions.
func (r *Relay) Sessions() int { return int(r.live.Load()) }

// Add takes ownership of two connected, non-blocking stream sockets. toServer
// and toClient are bytes already read from one side and not yet forwarded;
// they are sent first. onDone is called once, from a worker, after both fds
// are closed. On error the fds are still the caller's. The Session returned
// reads the session's counts and ends it.
func (r *Relay) Add(client, server int, toServer, toClient []byte, onDone func(Stats)) (*Session, error) {
	if r.closed.Load() {
		return nil, ErrClosed
	}
	for _, fd := range []int{client, server} {
		if err := unix.SetNonblock(fd, true); err != nil {
			return nil, fmt.Errorf("relay: set non-blocking: %w", err)
		}
	}
	w := r.workers[int(r.next.Add(1))%len(r.workers)]
	p := &pair{
		r: r, w: w, fds: [2]int{client, server}, start: time.Now(), onDone: onDone,
	}
	p.dirs[0] = direction{src: client, dst: server, pending: copyOrNil(toServer)}
	p.dirs[1] = direction{src: server, dst: client, pending: copyOrNil(toClient)}
	if err := w.add(p); err != nil {
		return nil, err
	}
	return &Session{p: p}, nil
}

// Session is a handle on one relayed session, safe for use from any
// goroutine.
type Session struct{ p *pair }

// Counts returns the bytes written so far each way (the read-ahead
// included), as Stats counts them at the end.
func (s *Session) Counts() (clientToServer, serverToClient uint64) {
	return s.p.dirs[0].bytes.Load(), s.p.dirs[1].bytes.Load()
}

// End asks the session's worker to end it now (both sockets closed, onDone
// called with reason). Ending a session that has ended does nothing.
func (s *Session) End(reason string) {
	w := s.p.w
	w.mu.Lock()
	if w.quit.Load() {
		w.mu.Unlock()
		return
	}
	w.ends = append(w.ends, endRequest{s.p, reason})
	w.mu.Unlock()
	w.signal()
}

// endRequest is a Session.End for the worker.
type endRequest struct {
	p      *pair
	reason string
}

func copyOrNil(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return append([]byte(nil), b...)
}

// Close ends every session (Reason "proxy shutdown") and stops the workers.
func (r *Relay) Close() error {
	if !r.closed.CompareAndSwap(false, true) {
		return nil
	}
	for _, w := range r.workers {
		w.stop()
	}
	return nil
}

func (r *Relay) getBuf() []byte  { return *(r.pool.Get().(*[]byte)) }
func (r *Relay) putBuf(b []byte) { b = b[:cap(b)]; r.pool.Put(&b) }

// direction is one way of a pair. Its buffer holds buf[off:end].
type direction struct {
	src, dst int
	pending  []byte // read-ahead handed over by the caller, sent first
	buf      []byte // nil when drained
	off, end int
	eof      bool // src said FIN
	shut     bool // dst got shutdown(SHUT_WR)
	blocked  bool // the last write to dst would have blocked
	// bytes is written by the worker only; atomic so that Session.Counts
	// may read it while the session runs (one uncontended add per write).
	bytes atomic.Uint64
}

type pair struct {
	r      *Relay
	w      *worker
	fds    [2]int
	dirs   [2]direction
	start  time.Time
	onDone func(Stats)
	done   bool
	// outArmed: EPOLLOUT is in the interest set of fds[i].
	outArmed [2]bool
}

// worker owns an epoll instance and the pairs registered on it. Pair state
// is only touched by the worker goroutine, except for registration, which
// happens under mu before the fds are added to epoll.
type worker struct {
	r    *Relay
	ep   *epoll.Set // waited on in Go's netpoller: an idle worker holds no P
	wake int        // eventfd to stop the worker
	mu   sync.Mutex
	byFD map[int]*pair
	ends []endRequest // Session.End requests, under mu
	quit atomic.Bool
	done chan struct{}
}

func newWorker(r *Relay) (*worker, error) {
	ep, err := epoll.New()
	if err != nil {
		return nil, fmt.Errorf("relay: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		ep.Close()
		return nil, fmt.Errorf("relay: eventfd: %w", err)
	}
	if err := unix.EpollCtl(ep.FD(), unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}); err != nil {
		ep.Close()
		unix.Close(wake)
		return nil, err
	}
	return &worker{r: r, ep: ep, wake: wake, byFD: map[int]*pair{}, done: make(chan struct{})}, nil
}

func (w *worker) add(p *pair) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.quit.Load() {
		return ErrClosed
	}
	w.byFD[p.fds[0]] = p
	w.byFD[p.fds[1]] = p
	// Edge-triggered. Every event on either fd pumps both directions of
	// the pair until EAGAIN, which is what edge triggering requires.
	// EPOLLOUT is armed only while a write is blocked (see setOut): the
	// kernel signals write space on almost every ACK, and listening to that
	// all the time doubles the wake-ups of a busy session.
	// Both start armed, so the first pump runs at once: the read-ahead
	// (the login's release, at least) must go out even if neither side
	// sends anything first.
	p.outArmed = [2]bool{true, true}
	for i, fd := range p.fds {
		ev := unix.EpollEvent{Events: readEvents | unix.EPOLLOUT, Fd: int32(fd)}
		if err := unix.EpollCtl(w.ep.FD(), unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			for _, f := range p.fds[:i] {
				_ = unix.EpollCtl(w.ep.FD(), unix.EPOLL_CTL_DEL, f, nil)
			}
			delete(w.byFD, p.fds[0])
			delete(w.byFD, p.fds[1])
			return fmt.Errorf("relay: epoll_ctl: %w", err)
		}
	}
	w.r.live.Add(1)
	return nil
}

func (w *worker) stop() {
	w.quit.Store(true)
	w.signal()
	<-w.done
}

// signal wakes the worker (stop, End).
func (w *worker) signal() {
	var one = []byte{1, 0, 0, 0, 0, 0, 0, 0}
	_, _ = unix.Write(w.wake, one)
}

func (w *worker) run() {
	defer close(w.done)
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := w.ep.Wait(events, -1)
		if err != nil {
			w.r.opts.Logger.Error("relay: epoll_wait failed; closing its sessions", "err", err)
			w.quit.Store(true)
		}
		for i := 0; i < n; i++ {
			fd := int(events[i].Fd)
			if fd == w.wake {
				var b [8]byte
				_, _ = unix.Read(w.wake, b[:])
				w.mu.Lock()
				ends := w.ends
				w.ends = nil
				w.mu.Unlock()
				for _, e := range ends {
					w.finish(e.p, e.reason) // does nothing if it has ended
				}
				continue
			}
			w.mu.Lock()
			p := w.byFD[fd]
			w.mu.Unlock()
			if p != nil && !p.done {
				w.pump(p)
			}
		}
		if w.quit.Load() {
			w.mu.Lock()
			pairs := make(map[*pair]bool)
			for _, p := range w.byFD {
				pairs[p] = true
			}
			w.mu.Unlock()
			for p := range pairs {
				w.finish(p, "proxy shutdown")
			}
			w.ep.Close()
			unix.Close(w.wake)
			return
		}
	}
}

const readEvents = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET

// pump moves what can be moved in both directions without blocking.
func (w *worker) pump(p *pair) {
	for i := range p.dirs {
		if reason := w.move(&p.dirs[i]); reason != "" {
			w.finish(p, reason)
			return
		}
	}
	if p.dirs[0].shut && p.dirs[1].shut {
		w.finish(p, "closed")
		return
	}
	// dirs[0] writes to the server (fds[1]), dirs[1] to the client (fds[0]).
	for i := range p.dirs {
		w.setOut(p, 1-i, p.dirs[i].blocked)
	}
}

// setOut arms or disarms EPOLLOUT on one fd of the pair.
func (w *worker) setOut(p *pair, i int, on bool) {
	if p.outArmed[i] == on {
		return
	}
	ev := unix.EpollEvent{Events: readEvents, Fd: int32(p.fds[i])}
	if on {
		ev.Events |= unix.EPOLLOUT
	}
	if unix.EpollCtl(w.ep.FD(), unix.EPOLL_CTL_MOD, p.fds[i], &ev) == nil {
		p.outArmed[i] = on
	}
}

// move runs one direction until the source has nothing or the destination
// takes nothing more. It returns a reason when the pair must end.
func (w *worker) move(d *direction) string {
	d.blocked = false
	for {
		// Drain what we hold first: order is preserved and memory stays bounded.
		n, why := w.writeOut(d, d.pending)
		d.pending = d.pending[n:]
		if why != "" || d.blocked {
			return why
		}
		n, why = w.writeOut(d, d.buf[d.off:d.end])
		d.off += n
		if why != "" || d.blocked {
			return why
		}
		if d.buf != nil {
			w.r.putBuf(d.buf)
			d.buf, d.off, d.end = nil, 0, 0
		}
		if d.eof {
			if !d.shut {
				// Pass the FIN on once every byte before it is out.
				_ = unix.Shutdown(d.dst, unix.SHUT_WR)
				d.shut = true
			}
			return ""
		}
		buf := w.r.getBuf()
		n, err := unix.Read(d.src, buf)
		switch {
		case err == unix.EAGAIN:
			w.r.putBuf(buf)
			return ""
		case err != nil:
			w.r.putBuf(buf)
			return w.side(d.src) + " reset: " + err.Error()
		case n == 0:
			w.r.putBuf(buf)
			d.eof = true
		default:
			d.buf, d.off, d.end = buf, 0, n
		}
	}
}

// writeOut writes p to d's destination until it is all out or the
// destination is full (d.blocked), counting the bytes; it returns how many
// it wrote and a reason when the pair must end.
func (w *worker) writeOut(d *direction, p []byte) (int, string) {
	done := 0
	for done < len(p) {
		n, err := unix.Write(d.dst, p[done:])
		if err == unix.EAGAIN {
			d.blocked = true
			return done, ""
		}
		if err != nil {
			return done, w.side(d.dst) + " write failed: " + err.Error()
		}
		d.bytes.Add(uint64(n))
		done += n
	}
	return done, ""
}

func (w *worker) side(fd int) string {
	w.mu.Lock()
	p := w.byFD[fd]
	w.mu.Unlock()
	if p != nil && p.fds[0] == fd {
		return "client"
	}
	return "server"
}

func (w *worker) finish(p *pair, reason string) {
	if p.done {
		return
	}
	p.done = true
	w.mu.Lock()
	delete(w.byFD, p.fds[0])
	delete(w.byFD, p.fds[1])
	w.mu.Unlock()
	for i := range p.dirs {
		if p.dirs[i].buf != nil {
			w.r.putBuf(p.dirs[i].buf)
			p.dirs[i].buf = nil
		}
	}
	// Closing removes the fds from epoll (they are the only references).
	unix.Close(p.fds[0])
	unix.Close(p.fds[1])
	w.r.live.Add(-1)
	if p.onDone != nil {
		p.onDone(Stats{
			ClientToServer: p.dirs[0].bytes.Load(),
			ServerToClient: p.dirs[1].bytes.Load(),
			Duration:       time.Since(p.start),
			Reason:         reason,
		})
	}
}
