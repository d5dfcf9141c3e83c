package bpf

import (
	"encoding/binary"
	"errors"
	"os"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// watch is the Splicer's one goroutine. It waits on a single epoll set for
// the spliced sockets (state changes: FIN, reset, error; readability and
// writability only while it moves a direction under flow control or waits
// to forward a FIN), the ring buffer of directions that enter or leave
// flow control or reach the hard bound, and the wake eventfd, plus a timer
// for the rechecks no event announces. It waits in Go's netpoller
// (bpf/epoll), so between events it holds no thread and no P.
func (s *Splicer) watch() {
	defer close(s.done)
	events := make([]unix.EpollEvent, 256)
	var rec ringbuf.Record
	var lost uint64
	nextSweep := time.Now().Add(sweepEvery)
	for {
		n, err := s.ep.Wait(events, s.timeout())
		if err != nil {
			s.log.Error("sockmap watcher: epoll_wait failed; tearing down spliced sessions", "error", err)
			s.mu.Lock()
			s.closed = true // nobody would watch new sessions
			s.mu.Unlock()
			s.shutdownAll("proxy shutdown")
			return
		}
		for _, ev := range events[:max(n, 0)] {
			switch id := uint32(ev.Fd); id {
			case idWake:
				var b [8]byte
				_, _ = unix.Read(s.wakefd, b[:])
				s.mu.Lock()
				closed, kicked, ends, park := s.closed, s.kicked, s.ends, s.park
				s.kicked, s.ends, s.park = nil, nil, nil
				s.mu.Unlock()
				if closed {
					s.shutdownAll("proxy shutdown")
					return
				}
				s.endRequested(ends)
				for _, id := range kicked {
					if ss := s.session(id); ss != nil {
						s.pollNew(ss)
					}
				}
				if park != nil && s.parked(park) {
					return // handed over: the sessions are another process's now
				}
			case idRing:
				s.readOver(&rec)
			default:
				if ss := s.session(id); ss != nil {
					s.event(ss, side(ev.Pad), ev.Events)
				}
			}
		}
		now := time.Now()
		for ss := range s.timed {
			if !ss.recheckAt.After(now) {
				s.step(ss)
			}
		}
		if !now.Before(nextSweep) {
			nextSweep = now.Add(sweepEvery)
			if n := s.lostNotifications(); n != lost {
				lost = n
				s.log.Warn("sockmap watcher: the ring buffer overflowed; looking at every session", "lost", n)
				s.stepAll()
			}
		}
	}
}

// parkReq is HandOver's request to the watcher: stop between two steps
// (parked closed), let HandOver read every session, then either exit
// (handed receives true: the sessions are handed over) or go on (false:
// the hand-over failed and nothing changed).
type parkReq struct {
	parked chan struct{}
	handed chan bool
}

// parked stops the watcher for HandOver and reports whether the sessions
// were handed over. It is called between steps, where every session is
// at a consistent point: no syscall of the watcher is half done, and what
// a direction under flow control read and has not written yet is in its
// out buffer, which HandOver sends along. Events that arrive meanwhile
// wait in epoll (edge-triggered events are queued, not lost) and the ring
// buffer.
func (s *Splicer) parked(p *parkReq) bool {
	close(p.parked)
	return <-p.handed
}

// sweepEvery is how often the watcher checks for notifications the ring
// buffer had no room for (the program counts them in the lost map).
const sweepEvery = time.Second

func (s *Splicer) lostNotifications() uint64 {
	var n uint64
	_ = s.obj.Lost.Lookup(uint32(0), &n)
	return n
}

// stepAll steps every session once.
func (s *Splicer) stepAll() {
	for _, ss := range s.snapshot() {
		if s.session(ss.id) != nil { // not torn down by an earlier step
			s.step(ss)
		}
	}
}

// snapshot lists the live sessions.
func (s *Splicer) snapshot() []*session {
	s.mu.Lock()
	defer s.mu.Unlock()
	all := make([]*session, 0, len(s.sessions))
	for _, ss := range s.sessions {
		all = append(all, ss)
	}
	return all
}

// timeout is how long the watcher's wait may last (negative: no limit):
// until the earliest recheck, or the next sweep for lost notifications
// while any session lives.
func (s *Splicer) timeout() time.Duration {
	if len(s.timed) == 0 {
		if s.Sessions() == 0 {
			return -1
		}
		return sweepEvery
	}
	var first time.Time
	for ss := range s.timed {
		if first.IsZero() || ss.recheckAt.Before(first) {
			first = ss.recheckAt
		}
	}
	return max(time.Until(first), 0)
}

func (s *Splicer) session(id uint32) *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sessions[id]
}

// event handles epoll events on one socket of a session.
func (s *Splicer) event(ss *session, sd side, ev uint32) {
	fd := ss.fds[sd]
	if ev&unix.EPOLLERR != 0 {
		e, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err == nil && e != 0 {
			s.teardown(ss, sockReason(sd, unix.Errno(e)))
			return
		}
	}
	if ev&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.sawFIN(ss, ss.dirs[sd])
	}
	s.step(ss)
}

// pollNew looks at a newly registered session once: it polls both sockets
// for what epoll may have reported before the session could be found (a
// FIN or reset during the handoff) and steps it (a direction may also have
// reached the backlog bound before the session was registered, and the
// ring buffer record found no session then).
func (s *Splicer) pollNew(ss *session) {
	pfds := []unix.PollFd{
		{Fd: int32(ss.fds[0]), Events: unix.POLLRDHUP},
		{Fd: int32(ss.fds[1]), Events: unix.POLLRDHUP},
	}
	if _, err := unix.Poll(pfds, 0); err == nil {
		for i, p := range pfds {
			if ev := uint32(p.Revents) & (unix.EPOLLRDHUP | unix.EPOLLHUP | unix.EPOLLERR); ev != 0 {
				s.event(ss, side(i), ev)
				if s.session(ss.id) == nil {
					return // torn down
				}
			}
		}
	}
	s.step(ss)
}

// readOver consumes the ring buffer: each record is the cookie of a socket
// whose direction the program just switched into or out of flow control,
// or stopped at the hard bound.
func (s *Splicer) readOver(rec *ringbuf.Record) {
	// A deadline in the past makes the Reader return what is there and
	// then os.ErrDeadlineExceeded instead of blocking; epoll already said
	// there is something.
	s.rb.SetDeadline(time.Unix(1, 0))
	for {
		err := s.rb.ReadInto(rec)
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, ringbuf.ErrClosed) {
			return
		}
		if err != nil {
			s.log.Warn("sockmap watcher: reading the backlog ring buffer", "error", err)
			return
		}
		if len(rec.RawSample) < 8 {
			continue
		}
		cookie := binary.NativeEndian.Uint64(rec.RawSample)
		s.mu.Lock()
		ss := s.byCookie[cookie]
		s.mu.Unlock()
		if ss != nil {
			s.step(ss)
		}
	}
}

// shutdownAll tears down every session (Close).
func (s *Splicer) shutdownAll(reason string) {
	for _, ss := range s.snapshot() {
		s.teardown(ss, reason)
	}
}
