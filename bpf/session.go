package bpf

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cilium/ebpf"
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

// noBase marks a direction whose source has no TCP byte count.
const noBase = ^uint64(0)

// Flags of splice.c's struct dir.
const (
	dirBaseSet = 1
	dirOver    = 2
	dirPass    = 4
	dirTCPSrc  = 8
)

// ReasonBacklogLimit is the Stats.Reason of a session ended because one
// direction reached Options.MaxBacklog.
const ReasonBacklogLimit = "backlog limit"

// baseMask is what the watcher always wants to hear about.
const baseMask = unix.EPOLLET | unix.EPOLLRDHUP

// Recheck intervals for a condition the kernel signals no event for: the
// redirect queue of a socket becoming empty, after a FIN (maxRecheck) or
// before the first relayed write of a flow-control episode (maxRelayWait:
// shorter, because the sender is held back meanwhile; the destination
// becoming writable, which its draining queue brings, also wakes it).
const (
	minRecheck   = time.Millisecond
	maxRecheck   = 100 * time.Millisecond
	maxRelayWait = 16 * time.Millisecond
)

// Flow control moves a direction's bytes through a buffer of relayBufSize
// bytes, and at most pumpBudget bytes per step before other sessions get a
// turn.
const (
	relayBufSize = 128 << 10
	pumpBudget   = 4 << 20
)

var relayBufs = sync.Pool{New: func() any { b := make([]byte, relayBufSize); return &b }}

// session is one spliced pair. After registration only the watcher
// goroutine touches it.
type session struct {
	id      uint32
	fds     [2]int
	cookies [2]uint64
	dirs    [2]*direction // by source side
	start   time.Time
	onDone  func(Stats)
	meta    []byte // the caller's, handed over with the session

	// A unix-socket server side: alt is the cookie of the database's end,
	// under which this kernel reports the bytes it sends (the server's
	// direction is keyed under both; see dirState).
	unixServer bool
	alt        uint64

	mask       [2]uint32 // epoll events registered per fd
	firstClose string    // the end reason once a side sent FIN
	recheckAt  time.Time // zero: no timer
	backoff    time.Duration
	relayWait  bool // the recheck waits for a relayed write (maxRelayWait)
}

// direction is the watcher's view of the bytes flowing from src to dst.
type direction struct {
	src, dst side
	pending  uint64 // read-ahead written to dst by Splice
	base     uint64 // writeProgress(dst) after the read-ahead
	rcvBase  uint64 // receiveBase(src) before src entered any map; noBase: unknown (unix)

	fin     bool // src received FIN
	shut    bool // shutdown(dst, SHUT_WR) done: direction finished
	waitOut bool // want EPOLLOUT on dst (draining, or a relayed write blocked)

	// Flow control: the program passes the direction's bytes to src, and
	// the watcher moves them. buf is non-nil while it does (and EPOLLIN is
	// wanted on src); out is the part of buf read and not yet written.
	buf           *[]byte
	out           []byte
	uread, uwrite uint64 // passed bytes read from src, written to dst
	published     spliceRelayed
	cleared       uint64 // the episode whose earlier redirects were seen out
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
		v.Passed += w.Passed
		v.Episodes += w.Episodes
		v.Flags |= w.Flags
		v.OverBacklog = max(v.OverBacklog, w.OverBacklog)
	}
	return v, nil
}

// queueEmpty reports whether every byte redirected to dst has entered
// dst's send queue, that is, the kernel's redirect queue for dst is empty
// and a FIN or a relayed write queued on dst now cannot overtake anything.
// Only the kworker (redirected bytes) and the watcher (uwrite) write to
// dst, so the bytes that entered its send queue since the base are both.
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
	return p-d.base-d.uwrite >= redirected, nil
}

// step advances both directions of a session after an event or a timer
// and tears it down when both are finished or one failed.
func (s *Splicer) step(ss *session) {
	wait := false
	ss.relayWait = false
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
		limit := maxRecheck
		if ss.relayWait {
			limit = maxRelayWait
		}
		if ss.backoff == 0 {
			ss.backoff = minRecheck
		} else if ss.backoff < limit {
			ss.backoff = min(2*ss.backoff, limit)
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

// stepDir advances one direction: it ends the session at the hard bound,
// moves the bytes the program passed under flow control, and forwards a
// FIN once every byte before it is out. It reports whether it waits for a
// condition that has no event (so the session needs a timed recheck).
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
		s.log.Warn("spliced session ended: a direction reached the kernel backlog bound (a peer that sends while it reads nothing, or flow control is off)",
			"from", d.src.String(), "to", d.dst.String(), "held", v.OverBacklog, "max_backlog", s.maxBacklog,
			"redirected", v.Redirected, "passed", v.Passed, "relayed", d.uwrite)
		return false, errOver
	}
	wait := false
	if d.buf != nil || v.Flags&dirPass != 0 || v.Passed > d.uread {
		if wait, err = s.pump(ss, d, &v); err != nil {
			return false, err
		}
	}
	if !d.fin {
		return wait, nil
	}
	w, err := s.flush(ss, d)
	return wait || w, err
}

// pump moves the bytes the program passed (flow control) from src to dst
// until src has nothing more to read, dst takes nothing more, or the
// budget for one turn is spent. v is the direction's state, refreshed here
// after every read. It reports whether a timed recheck is needed.
//
// The ordering rules, each needed (see doc.go for the kernel side):
//   - src is read only with read(2) (recvmsg): it takes the psock's
//     ingress_msg, where passed bytes are, and reopens TCP's window.
//   - A byte read is written only once every byte redirected before its
//     episode began is in dst's send path (queueEmpty). Which episode the
//     byte belongs to is known after the read: the program counts the
//     episode before it passes the episode's first byte, and it cannot end
//     an episode while the watcher holds a byte it has not written
//     (passed > written), so v.Redirected is final for it.
//   - What was read and written is published (relayed map) only after the
//     write returned, and only the program switches back to redirecting,
//     at the first skb that finds everything passed written.
func (s *Splicer) pump(ss *session, d *direction, v *spliceDir) (bool, error) {
	src, dst := ss.fds[d.src], ss.fds[d.dst]
	if d.buf == nil {
		d.buf = relayBufs.Get().(*[]byte)
	}
	defer func() {
		if err := s.publish(ss, d); err != nil {
			s.log.Warn("sockmap watcher: publishing relayed bytes", "error", err)
		}
	}()
	budget := pumpBudget
	var err error
	for budget > 0 {
		if len(d.out) > 0 {
			if d.cleared != v.Episodes {
				empty, err := s.queueEmpty(ss, d, v.Redirected)
				if err != nil {
					return false, err
				}
				if !empty {
					ss.relayWait = true
					d.waitOut = true // dst's writability also moves its queue along
					return true, nil
				}
				d.cleared = v.Episodes
			}
			n, err := unix.Write(dst, d.out)
			if n > 0 {
				d.out = d.out[n:]
				d.uwrite += uint64(n)
				budget -= n
			}
			switch {
			case err == nil || err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				d.waitOut = true
				return false, nil
			default:
				return false, &sideError{d.dst, err}
			}
		}
		d.waitOut = false
		n, rerr := unix.Read(src, *d.buf)
		switch {
		case n > 0:
			d.uread += uint64(n)
			d.out = (*d.buf)[:n]
			if *v, err = s.dirState(ss, d); err != nil {
				return false, fmt.Errorf("reading direction state: %w", err)
			}
			continue
		case rerr == nil:
			// EOF: src received FIN. Passed bytes may still wait in the
			// kernel's queue behind it (flush checks the counts).
			s.sawFIN(ss, d)
		case rerr == unix.EINTR:
			continue
		case rerr != unix.EAGAIN:
			return false, &sideError{d.src, rerr}
		}
		break
	}
	if budget <= 0 {
		return true, nil
	}
	if v.Flags&dirPass == 0 && d.uread == v.Passed {
		// Caught up, and the program redirects again (it said so on the
		// ring buffer): nothing more will be passed until the next
		// episode, which the ring buffer announces too.
		relayBufs.Put(d.buf)
		d.buf, d.out = nil, nil
	}
	return false, nil
}

// publish tells the program what the watcher has read and written of a
// direction's passed bytes (only after the writes returned).
func (s *Splicer) publish(ss *session, d *direction) error {
	r := spliceRelayed{Read: d.uread, Written: d.uwrite}
	if r.Read == d.published.Read && r.Written == d.published.Written {
		return nil
	}
	// In place, under the entry's lock (see struct relayed in splice.c).
	if err := s.obj.Relayed.Update(ss.cookies[d.src], &r, ebpf.UpdateLock); err != nil {
		return err
	}
	d.published = r
	return nil
}

// sawFIN records that src sent FIN.
func (s *Splicer) sawFIN(ss *session, d *direction) {
	if !d.fin {
		d.fin = true
		if ss.firstClose == "" {
			ss.firstClose = d.src.String() + " closed"
		}
	}
}

// flush passes a FIN from src on to dst once every byte before it is out:
// shutdown(dst, SHUT_WR) while the redirect queue still held bytes would
// make the kernel's later send of them fail (EPIPE) and lose them, and
// every byte the program passed must have been relayed.
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
	if v.Passed != d.uwrite {
		// Passed bytes not yet relayed: readable now (EPOLLIN), or still
		// in src's psock queue behind bytes for src (the kworker wakes
		// EPOLLIN when it moves them), or read and waiting for dst.
		if d.buf == nil {
			// Passed after the last pump looked: go read them.
			return true, nil
		}
		return len(d.out) == 0, nil
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
	if d.buf != nil {
		relayBufs.Put(d.buf)
		d.buf, d.out = nil, nil
	}
	return false, nil
}

// updateMasks registers EPOLLIN on the source of a direction under flow
// control (passed bytes to read) and EPOLLOUT on a socket whose redirect
// queue the watcher waits to see drained (it becomes writable as it
// drains; a timer covers the rest) or that refused a relayed write. Only
// then: a socket in the verdict map signals readability for every skb the
// program redirects, and each of those would wake the watcher.
func (s *Splicer) updateMasks(ss *session) {
	for i := range ss.fds {
		m := uint32(baseMask)
		if d := ss.dirs[i]; d.buf != nil && !d.shut {
			m |= unix.EPOLLIN
		}
		if d := ss.dirs[1-i]; d.waitOut {
			m |= unix.EPOLLOUT
		}
		if m == ss.mask[i] {
			continue
		}
		ev := unix.EpollEvent{Events: m, Fd: int32(ss.id), Pad: int32(i)}
		if err := unix.EpollCtl(s.ep.FD(), unix.EPOLL_CTL_MOD, ss.fds[i], &ev); err == nil {
			ss.mask[i] = m
		}
	}
}

// audit checks, at the clean end of a session, that the program saw each
// byte its TCP sources received exactly once: redirected + passed must
// equal tcpi_bytes_received since the splice. More means the kernel handed
// the verdict bytes twice (a duplicate reaches the peer), less that some
// never reached it (a gap); either is a kernel anomaly, logged with every
// counter that tells where it happened, counted (Splicer.Anomalies) and
// named in Stats.Anomaly. It cannot undo what the peer received.
func (s *Splicer) audit(ss *session, counted [2]spliceDir, st *Stats) {
	for i, d := range ss.dirs {
		if d.rcvBase == noBase {
			continue
		}
		got, err := received(ss.fds[d.src])
		if err != nil {
			continue
		}
		got -= d.rcvBase
		if d.fin && got > 0 {
			got-- // tcp_rcv_nxt_update counts the FIN's sequence number too
		}
		seen := counted[i].Redirected + counted[i].Passed
		if seen == got {
			continue
		}
		s.anomalies.Add(1)
		c := counted[i]
		st.Anomaly = fmt.Sprintf("%s->%s: TCP received %d bytes, the program saw %d (redirected %d, passed %d; relayed read %d, written %d; episodes %d; skbs overlapping earlier ones %d, %d bytes; skbs after a gap %d)",
			d.src, d.dst, got, seen, c.Redirected, c.Passed, d.uread, d.uwrite, c.Episodes, c.Overlaps, c.OverlapBytes, c.Gaps)
		s.log.Error("spliced session: the kernel's byte counts disagree (a duplicate or a gap)", "anomaly", st.Anomaly)
	}
}

// quiesce waits for any verdict still running on a session's sockets once
// they are out of the verdict map. A verdict holds a pointer to its
// direction's entry and writes through it; deleting the entry under it
// would let the next session's entry reuse the element and receive that
// write. Verdicts run under the socket lock and setsockopt takes it, so
// after rcvlowatKick no verdict of that socket is running, and none can
// start (the socket is out of the verdict map). A unix socket's verdict
// runs under its iolock instead, which nothing here can take: for a unix
// upstream this leaves the window it closes for TCP.
func (s *Splicer) quiesce(ss *session) {
	for i, fd := range ss.fds {
		if side(i) == sideServer && ss.unixServer {
			continue
		}
		_ = rcvlowatKick(fd)
	}
}

// teardown ends a session: map entries out, fds closed, onDone called.
func (s *Splicer) teardown(ss *session, reason string) {
	var counted [2]spliceDir
	for _, c := range ss.cookies {
		_ = s.obj.VerdictSocks.Delete(c)
	}
	s.quiesce(ss)
	for i, d := range ss.dirs {
		if d != nil {
			counted[i], _ = s.dirState(ss, d)
		}
	}
	st := Stats{Duration: time.Since(ss.start), Reason: reason}
	if reason == "client closed" || reason == "server closed" {
		s.audit(ss, counted, &st) // before the fds close
	}
	s.unmap(ss)
	for _, fd := range ss.fds {
		_ = unix.EpollCtl(s.ep.FD(), unix.EPOLL_CTL_DEL, fd, nil)
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

	moved := func(sd side) uint64 { return ss.dirs[sd].pending + counted[sd].Redirected + ss.dirs[sd].uwrite }
	st.ClientToServer, st.ServerToClient = moved(sideClient), moved(sideServer)
	for i, d := range ss.dirs {
		st.FlowControl += counted[i].Episodes
		st.Relayed += d.uwrite
		if d.buf != nil {
			relayBufs.Put(d.buf)
			d.buf, d.out = nil, nil
		}
	}
	s.episodes.Add(st.FlowControl)
	s.relayed.Add(st.Relayed)
	for _, c := range counted {
		s.dupSkbs.Add(c.Overlaps)
		s.dupBytes.Add(c.OverlapBytes)
	}
	if ss.onDone != nil {
		ss.onDone(st)
	}
}
