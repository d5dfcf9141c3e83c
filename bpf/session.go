package bpf

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// side indexes the two sockets of a session.
type side int

const (
	sideClient side = iota
	sideServer
)

func (sd side) String() string {
	if sd == sideClient {
		return "client"
	}
	return "server"
}

// Flags of splice.c's struct dir.
const (
	dirBaseSet = 1
	dirOver    = 2
)

// ReasonBacklogLimit is the Stats.Reason of a session ended because one
// direction reached Options.MaxBacklog.
const ReasonBacklogLimit = "backlog limit"

// baseMask is what the watcher always wants to hear about.
const baseMask = unix.EPOLLET | unix.EPOLLRDHUP

// Recheck intervals for a condition the kernel signals no event for (the
// redirect queue of a socket becoming empty after a FIN).
const (
	minRecheck = time.Millisecond
	maxRecheck = 100 * time.Millisecond
)

// session is one spliced pair. After registration only the watcher
// goroutine touches it.
type session struct {
	id      uint32
	fds     [2]int
	cookies [2]uint64
	dirs    [2]*direction // by source side
	start   time.Time
	onDone  func(Stats)

	// A unix-socket server side: alt is the cookie of the database's end,
	// under which this kernel reports the bytes it sends (the server's
	// direction is keyed under both; see dirState).
	unixServer bool
	alt        uint64

	mask       [2]uint32 // epoll events registered per fd
	firstClose string    // the end reason once a side sent FIN
	recheckAt  time.Time // zero: no timer
	backoff    time.Duration
}

// direction is the watcher's view of the bytes flowing from src to dst.
type direction struct {
	src, dst side
	pending  uint64 // read-ahead written to dst by Splice
	base     uint64 // writeProgress(dst) after the read-ahead

	fin     bool // src received FIN
	shut    bool // shutdown(dst, SHUT_WR) done: direction finished
	waitOut bool // want EPOLLOUT on dst (its redirect queue is draining)
}

// dirState reads the program's view of a direction. A unix server's
// direction has two entries, one per cookie the kernel may name; one of
// them stays untouched, and their sum is the direction.
func (s *Splicer) dirState(ss *session, d *direction) (spliceDir, error) {
	var v spliceDir
	if err := s.obj.Dirs.Lookup(ss.cookies[d.src], &v); err != nil {
		return v, err
	}
	if d.src == sideServer && ss.alt != 0 {
		var w spliceDir
		if err := s.obj.Dirs.Lookup(ss.alt, &w); err != nil {
			return v, err
		}
		v.Redirected += w.Redirected
		v.Flags |= w.Flags
		v.OverBacklog = max(v.OverBacklog, w.OverBacklog)
	}
	return v, nil
}

// queueEmpty reports whether every byte redirected to dst has entered
// dst's send queue, that is, the kernel's redirect queue for dst is empty
// and a FIN queued on dst now cannot overtake anything.
func (s *Splicer) queueEmpty(ss *session, d *direction, redirected uint64) (bool, error) {
	if d.dst == sideServer && ss.unixServer {
		// No write_seq on a unix socket: ask the kernel for the length
		// of its redirect queue directly (the sockmap iterator).
		q, err := s.obj.queueLen(ss.cookies[sideServer])
		if err != nil {
			return false, err
		}
		return q <= 0, nil
	}
	p, err := writeProgress(ss.fds[d.dst])
	if errors.Is(err, errBusy) {
		return false, nil
	}
	if err != nil {
		return false, &sideError{d.dst, err}
	}
	return p-d.base >= redirected, nil
}

// step advances both directions of a session after an event or a timer
// and tears it down when both are finished or one failed.
func (s *Splicer) step(ss *session) {
	wait := false
	for _, d := range ss.dirs {
		w, err := s.stepDir(ss, d)
		if errors.Is(err, errOver) {
			s.teardown(ss, ReasonBacklogLimit)
			return
		}
		if err != nil {
			s.teardown(ss, s.errReason(ss, err))
			return
		}
		wait = wait || w
	}
	if ss.dirs[0].shut && ss.dirs[1].shut {
		s.teardown(ss, ss.firstClose)
		return
	}
	if ss.unixServer && ss.dirs[sideServer].shut {
		// When the database's end of a unix socket shuts down, the kernel
		// takes the proxy's end out of every sockmap (unix_shutdown and
		// unix_release call the psock's unhash), dropping what was queued
		// towards it; nothing the client sends can reach the database
		// any more. PostgreSQL only ever closes fully, so the session
		// ends here, once the database's last bytes are out.
		s.teardown(ss, ss.firstClose)
		return
	}
	s.updateMasks(ss)
	if wait {
		if ss.backoff == 0 {
			ss.backoff = minRecheck
		} else if ss.backoff < maxRecheck {
			ss.backoff *= 2
		}
		ss.recheckAt = time.Now().Add(ss.backoff)
		s.timed[ss] = struct{}{}
	} else {
		ss.backoff = 0
		ss.recheckAt = time.Time{}
		delete(s.timed, ss)
	}
}

// errOver ends a session at the backlog bound.
var errOver = errors.New(ReasonBacklogLimit)

// sideError is an error on one socket of a session.
type sideError struct {
	side side
	err  error
}

func (e *sideError) Error() string { return fmt.Sprintf("%s: %v", e.side, e.err) }

func (s *Splicer) errReason(ss *session, err error) string {
	var se *sideError
	if errors.As(err, &se) {
		return sockReason(se.side, se.err)
	}
	return "error: " + err.Error()
}

// sockReason names the end of a session caused by a socket error.
func sockReason(sd side, err error) string {
	if errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EPIPE) || errors.Is(err, unix.ECONNABORTED) {
		return sd.String() + " reset"
	}
	return sd.String() + " error: " + err.Error()
}

// stepDir advances one direction: it ends the session at the backlog
// bound and forwards a FIN once every byte before it is out. It reports
// whether it waits for a condition that has no event (so the session needs
// a timed recheck).
func (s *Splicer) stepDir(ss *session, d *direction) (bool, error) {
	if d.shut {
		return false, nil
	}
	v, err := s.dirState(ss, d)
	if err != nil {
		return false, fmt.Errorf("reading direction state: %w", err)
	}
	if v.Flags&dirOver != 0 {
		s.overs.Add(1)
		s.lastOver.Store(v.OverBacklog)
		s.log.Warn("spliced session ended: a direction reached the kernel backlog bound (its reader is too slow or stopped)",
			"from", d.src.String(), "to", d.dst.String(), "backlog", v.OverBacklog, "max_backlog", s.maxBacklog,
			"redirected", v.Redirected)
		return false, errOver
	}
	if !d.fin {
		return false, nil
	}
	return s.flush(ss, d)
}

// flush passes a FIN from src on to dst once every byte before it is out:
// shutdown(dst, SHUT_WR) while the redirect queue still held bytes would
// make the kernel's later send of them fail (EPIPE) and lose them.
func (s *Splicer) flush(ss *session, d *direction) (bool, error) {
	// The watcher learns of the FIN from tcp_fin's state change, which
	// runs in the same softirq section as, but before, the sk_data_ready
	// that runs the verdict for the bytes that came with it. Taking the
	// socket lock (any setsockopt does) waits for that section to end, so
	// the counters read after it are final.
	if err := rcvlowatKick(ss.fds[d.src]); err != nil {
		return false, &sideError{d.src, err}
	}
	v, err := s.dirState(ss, d)
	if err != nil {
		return false, err
	}
	if v.Flags&dirOver != 0 {
		return false, errOver
	}
	empty, err := s.queueEmpty(ss, d, v.Redirected)
	if err != nil {
		return false, err
	}
	if !empty {
		d.waitOut = true
		return true, nil
	}
	if err := unix.Shutdown(ss.fds[d.dst], unix.SHUT_WR); err != nil && err != unix.ENOTCONN {
		return false, &sideError{d.dst, err}
	}
	d.shut, d.waitOut = true, false
	return false, nil
}

// updateMasks registers EPOLLOUT on a socket whose redirect queue the
// watcher waits to see drained (it becomes writable as it drains; a timer
// covers the rest).
func (s *Splicer) updateMasks(ss *session) {
	for i := range ss.fds {
		m := uint32(baseMask)
		if d := ss.dirs[1-i]; d.waitOut {
			m |= unix.EPOLLOUT
		}
		if m == ss.mask[i] {
			continue
		}
		ev := unix.EpollEvent{Events: m, Fd: int32(ss.id), Pad: int32(i)}
		if err := unix.EpollCtl(s.epfd, unix.EPOLL_CTL_MOD, ss.fds[i], &ev); err == nil {
			ss.mask[i] = m
		}
	}
}

// teardown ends a session: map entries out, fds closed, onDone called.
func (s *Splicer) teardown(ss *session, reason string) {
	var counted [2]spliceDir
	for _, c := range ss.cookies {
		_ = s.obj.VerdictSocks.Delete(c)
	}
	for i, d := range ss.dirs {
		if d != nil {
			counted[i], _ = s.dirState(ss, d)
		}
	}
	s.unmap(ss)
	for _, fd := range ss.fds {
		_ = unix.EpollCtl(s.epfd, unix.EPOLL_CTL_DEL, fd, nil)
		_ = unix.Close(fd)
	}
	s.mu.Lock()
	delete(s.sessions, ss.id)
	for _, c := range ss.cookies {
		delete(s.byCookie, c)
	}
	delete(s.byCookie, ss.alt)
	s.mu.Unlock()
	delete(s.timed, ss)

	st := Stats{Duration: time.Since(ss.start), Reason: reason}
	moved := func(sd side) uint64 { return ss.dirs[sd].pending + counted[sd].Redirected }
	st.ClientToServer, st.ServerToClient = moved(sideClient), moved(sideServer)
	if ss.onDone != nil {
		ss.onDone(st)
	}
}
