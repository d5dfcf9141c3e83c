package bpf

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bpf/epoll"
)

// DefaultFlowThreshold is the flow-control threshold used when
// Options.FlowThreshold is 0: a few MiB, enough that a healthy reader on
// loopback rarely leaves the kernel path (the kworker that sends
// redirected bytes runs in bursts), small enough that a stalled reader
// pins little kernel memory.
const DefaultFlowThreshold = 4 << 20

// DefaultMaxBacklog is the hard bound used when Options.MaxBacklog is 0.
// With flow control on, no healthy session reaches it (see Options).
const DefaultMaxBacklog = 64 << 20

// DefaultPendingWriteTimeout bounds how long Splice waits for a peer to
// accept the read-ahead when Options.PendingWriteTimeout is 0.
const DefaultPendingWriteTimeout = 5 * time.Second

// Options configure a Splicer.
type Options struct {
	// FlowThreshold is the flow-control threshold: the bytes one direction
	// of a session may have in the kernel's redirect queue (redirected but
	// not yet in the destination's send queue; that queue is charged to
	// neither socket, so it is the memory a slow reader could otherwise
	// grow without bound). Past it the program stops redirecting that
	// direction: its bytes stay in the source socket, where TCP's window
	// closes, and the watcher moves them to the destination in user space
	// at the pace the destination takes them; once it has caught up, the
	// program redirects again (see splice.c). So a slow reader or a bulk
	// upload slows its sender as a direct connection would, and the
	// kernel holds at most FlowThreshold plus one skb per direction
	// outside the sockets' own buffers. 0 means DefaultFlowThreshold; a
	// negative value turns flow control off (MaxBacklog then ends any
	// session whose reader falls that far behind).
	FlowThreshold int64
	// MaxBacklog is the hard bound per direction: a session is ended
	// (Reason "backlog limit") when the kernel holds more than this many
	// of its bytes outside both sockets' buffers. With flow control on,
	// only a peer that defeats it reaches the bound: one that keeps
	// sending while it reads nothing of what it is sent, whose passed
	// bytes then queue behind the bytes it does not read. Without flow
	// control it is the lead a reader may fall behind its sender. 0 means
	// DefaultMaxBacklog.
	MaxBacklog int64
	// PendingWriteTimeout bounds how long Splice waits for a peer to take
	// the read-ahead. 0 means DefaultPendingWriteTimeout.
	PendingWriteTimeout time.Duration
	// Logger receives a warning for every session ended at the hard
	// bound; nil discards.
	Logger *slog.Logger
}

// Stats describe a spliced session when it ends.
type Stats struct {
	// ClientToServer and ServerToClient count the bytes moved in each
	// direction: redirected by the kernel plus the read-ahead written by
	// Splice.
	ClientToServer, ServerToClient uint64
	// FlowControl counts the times a direction of the session entered
	// flow control (reached the threshold and was moved in user space
	// until it caught up); Relayed counts the bytes moved that way (they
	// are included in ClientToServer and ServerToClient).
	FlowControl, Relayed uint64
	// Anomaly is empty unless the end-of-session audit found that the
	// kernel handed the program a different number of bytes than TCP
	// received (see Splicer.Anomalies).
	Anomaly string
	// Duration is the time from Splice to the teardown.
	Duration time.Duration
	// Reason says why the session ended: "client closed", "server closed",
	// "client reset", "server reset", "client error: …", "server error: …",
	// "backlog limit" or "proxy shutdown".
	Reason string
}

// Splicer owns the loaded BPF objects and one process-wide watcher
// goroutine that follows every spliced pair (epoll on both fds for
// EPOLLRDHUP|EPOLLHUP|EPOLLERR, and for EPOLLIN/EPOLLOUT while it moves a
// direction under flow control, plus the ring buffer on which the program
// reports directions that enter or leave flow control or reach the hard
// bound).
//
// The maps, all keyed by socket cookie: targets (program-less SOCKHASH,
// redirect destinations), verdict_socks (SOCKHASH with the verdict program
// attached), dirs (per-direction peer, thresholds, state and byte
// counters, owned by the program), relayed (what the watcher read and
// wrote of each direction's passed bytes, owned by user space) and events
// (ring buffer of directions that need the watcher).
type Splicer struct {
	log        *slog.Logger
	maxBacklog uint64
	flowAt     uint64 // 0: flow control off
	pendingTO  time.Duration
	obj        *loaded
	rb         *ringbuf.Reader
	ep         *epoll.Set // the watcher's: waited on in Go's netpoller (package epoll)
	wakefd     int        // eventfd: Close wakes the watcher

	// life serializes Close and HandOver: each ends the Splicer's
	// ownership of its sessions in its own way.
	life sync.Mutex

	mu       sync.Mutex
	closed   bool
	handing  bool       // HandOver is under way: Splice refuses new sessions
	splicing int        // Splice calls past their first check, not yet returned
	idle     *sync.Cond // on mu: signalled when splicing drops to 0
	park     *parkReq   // HandOver asks the watcher to stop at a consistent point
	nextID   uint32
	sessions map[uint32]*session // by id (the epoll data)
	byCookie map[uint64]*session
	kicked   []uint32     // sessions the watcher should look at once
	ends     []endRequest // sessions to end now (Live.End)

	timed map[*session]struct{} // sessions with a recheck due; watcher only

	overs     atomic.Uint64 // sessions ended at the backlog bound, ever
	lastOver  atomic.Uint64 // the program's backlog when the bound was last reached
	episodes  atomic.Uint64 // flow-control episodes of ended sessions
	relayed   atomic.Uint64 // bytes moved in user space by flow control, ended sessions
	anomalies atomic.Uint64 // sessions whose audit failed
	dupSkbs   atomic.Uint64 // skbs the kernel handed the verdict again (trim_seen)
	dupBytes  atomic.Uint64 // and their bytes seen before, removed

	done chan struct{} // closed when the watcher has exited
}

// Epoll data values reserved for the Splicer's own fds; sessions use ids
// from firstSessionID on.
const (
	idWake uint32 = iota
	idRing
	firstSessionID
)

// NewSplicer loads and attaches the verdict program and starts the
// watcher. On error nothing is left loaded.
func NewSplicer(opts Options) (*Splicer, error) {
	s := newShell(opts)
	var err error
	if s.obj, err = load(); err != nil {
		return nil, err
	}
	if err := s.open(); err != nil {
		s.release()
		return nil, err
	}
	go s.watch()
	return s, nil
}

// newShell builds a Splicer with no kernel objects and no watcher.
func newShell(opts Options) *Splicer {
	s := &Splicer{
		log:        opts.Logger,
		maxBacklog: uint64(opts.MaxBacklog),
		pendingTO:  opts.PendingWriteTimeout,
		wakefd:     -1,
		nextID:     firstSessionID,
		sessions:   make(map[uint32]*session),
		byCookie:   make(map[uint64]*session),
		timed:      make(map[*session]struct{}),
		done:       make(chan struct{}),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if opts.MaxBacklog <= 0 {
		s.maxBacklog = DefaultMaxBacklog
	}
	switch {
	case opts.FlowThreshold == 0:
		s.flowAt = DefaultFlowThreshold
	case opts.FlowThreshold > 0:
		s.flowAt = uint64(opts.FlowThreshold)
	}
	if s.pendingTO <= 0 {
		s.pendingTO = DefaultPendingWriteTimeout
	}
	s.idle = sync.NewCond(&s.mu)
	return s
}

// open acquires what the watcher waits on, for the kernel objects in
// s.obj. On error the caller releases.
func (s *Splicer) open() error {
	var err error
	if s.rb, err = ringbuf.NewReader(s.obj.Events); err != nil {
		return fmt.Errorf("bpf: ring buffer: %w", err)
	}
	if s.ep, err = epoll.New(); err != nil {
		return fmt.Errorf("bpf: %w", err)
	}
	if s.wakefd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return fmt.Errorf("bpf: eventfd: %w", err)
	}
	if err := s.epollAdd(s.wakefd, idWake, 0, unix.EPOLLIN); err != nil {
		return err
	}
	// The ring buffer map fd is pollable on its own; the Reader is only
	// used to consume records, never to wait.
	return s.epollAdd(s.obj.Events.FD(), idRing, 0, unix.EPOLLIN)
}

// release frees what NewSplicer acquired; the watcher must not be running.
func (s *Splicer) release() error {
	if s.obj == nil {
		return nil
	}
	var errs []error
	if s.rb != nil {
		errs = append(errs, s.rb.Close())
	}
	if s.ep != nil {
		errs = append(errs, s.ep.Close())
	}
	if s.wakefd >= 0 {
		errs = append(errs, unix.Close(s.wakefd))
	}
	errs = append(errs, s.obj.close())
	return errors.Join(errs...)
}

// Sessions returns the number of live spliced pairs.
func (s *Splicer) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// MapEntries counts the entries in all of the Splicer's maps (for tests
// and introspection: 0 when no session is live).
func (s *Splicer) MapEntries() (int, error) {
	n := 0
	for _, m := range []*ebpf.Map{s.obj.Targets, s.obj.VerdictSocks, s.obj.Dirs, s.obj.Relayed} {
		// Keys only (NextKey): a value lookup is not what is counted, and
		// a socket-map entry can go away between the two calls.
		var key, next uint64
		var prev any // nil: start from the first key
		for {
			err := m.NextKey(prev, &next)
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				break
			}
			if err != nil {
				return n, fmt.Errorf("bpf: iterating %v: %w", m, err)
			}
			n++
			key = next
			prev = key
		}
	}
	return n, nil
}

// BacklogLimitEnds returns how many sessions ended at the backlog bound
// since NewSplicer.
func (s *Splicer) BacklogLimitEnds() uint64 { return s.overs.Load() }

// KernelDuplicates returns, over ended sessions, how many skbs the kernel
// handed the verdict with bytes it had already handed it, and how many such
// bytes the program removed (see trim_seen in splice.c).
func (s *Splicer) KernelDuplicates() (skbs, bytes uint64) {
	return s.dupSkbs.Load(), s.dupBytes.Load()
}

// Anomalies returns how many sessions ended cleanly with byte counts that
// disagree with TCP's (see Stats.Anomaly); 0 is the only healthy value.
func (s *Splicer) Anomalies() uint64 { return s.anomalies.Load() }

// FlowControl returns, over the sessions that have ended since
// NewSplicer, how many times a direction entered flow control and how many
// bytes flow control moved in user space.
func (s *Splicer) FlowControl() (episodes, relayed uint64) {
	return s.episodes.Load(), s.relayed.Load()
}

// Close tears down every pair (Reason "proxy shutdown"), stops the
// watcher, detaches the program and closes the maps. onDone runs for every
// pair before Close returns. It waits for a HandOver under way; after a
// successful one it does nothing.
func (s *Splicer) Close() error {
	s.life.Lock()
	defer s.life.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	if _, err := unix.Write(s.wakefd, eventfdOne); err != nil {
		return fmt.Errorf("bpf: waking the watcher: %w", err)
	}
	<-s.done
	return s.release()
}

func (s *Splicer) epollAdd(fd int, id uint32, side int32, events uint32) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(id), Pad: side}
	if err := unix.EpollCtl(s.ep.FD(), unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("bpf: epoll add: %w", err)
	}
	return nil
}
