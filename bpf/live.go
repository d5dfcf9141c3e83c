package bpf

import (
	"errors"

	"github.com/cilium/ebpf"
)

// Live sessions: what `pgmfa sessions` shows and ends while a spliced
// session runs. The counts come from the program's own counters (the dirs
// and relayed maps), read with one lookup each, so looking costs the data
// path nothing; ending is done by the watcher, the only goroutine that may
// close a session's sockets.

// ErrEnded is returned by Live.Counts once the session has ended.
var ErrEnded = errors.New("bpf: the spliced session has ended")

// Live names one spliced session for Counts and End. It is keyed by the
// client socket's cookie, which the kernel never reuses, so a Live of an
// ended session can never reach a later one. The zero Live names none.
type Live struct {
	s      *Splicer
	cookie uint64
}

// SpliceLive is SpliceWithMeta that also returns the session's Live.
func (s *Splicer) SpliceLive(client, server int, toServer, toClient, meta []byte, onDone func(Stats)) (Live, error) {
	ck, err := cookieOf(client)
	if err != nil {
		return Live{}, err
	}
	if err := s.SpliceWithMeta(client, server, toServer, toClient, meta, onDone); err != nil {
		return Live{}, err
	}
	return Live{s: s, cookie: ck}, nil
}

// find returns the live session, or nil.
func (l Live) find() *session {
	if l.s == nil {
		return nil
	}
	l.s.mu.Lock()
	defer l.s.mu.Unlock()
	return l.s.byCookie[l.cookie]
}

// Counts returns the bytes the session has moved so far in each direction,
// counted as Stats counts them at the end: the read-ahead, what the kernel
// redirected, and what flow control moved in user space. A redirected byte
// is counted when the program hands it to the destination socket, so the
// counts may run a socket buffer ahead of what the peer has read.
func (l Live) Counts() (clientToServer, serverToClient uint64, err error) {
	ss := l.find()
	if ss == nil {
		return 0, 0, ErrEnded
	}
	var n [2]uint64
	for i, d := range ss.dirs {
		// dirs, cookies, alt and pending are fixed before the session is
		// registered; everything else of the session is the watcher's.
		v, err := l.s.dirState(ss, d)
		if err != nil {
			return 0, 0, ErrEnded // torn down under us
		}
		var r spliceRelayed
		if err := l.s.obj.Relayed.LookupWithFlags(ss.cookies[i], &r, ebpf.LookupLock); err != nil {
			return 0, 0, ErrEnded
		}
		n[i] = d.pending + v.Redirected + r.Written
	}
	return n[sideClient], n[sideServer], nil
}

// End asks the watcher to tear the session down now, both sockets closed,
// with Stats.Reason reason; onDone runs as for any other end. It reports
// whether the session was still live.
func (l Live) End(reason string) bool {
	ss := l.find()
	if ss == nil {
		return false
	}
	l.s.mu.Lock()
	if l.s.closed {
		l.s.mu.Unlock()
		return false
	}
	l.s.ends = append(l.s.ends, endRequest{ss, reason})
	l.s.mu.Unlock()
	l.s.wake()
	return true
}

// endRequest is an End for the watcher.
type endRequest struct {
	ss     *session
	reason string
}

// endRequested tears down the sessions End asked for (watcher only).
func (s *Splicer) endRequested(ends []endRequest) {
	for _, e := range ends {
		if s.session(e.ss.id) == e.ss { // not ended meanwhile
			s.teardown(e.ss, e.reason)
		}
	}
}
