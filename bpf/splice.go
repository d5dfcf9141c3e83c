package bpf

import (
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Splice takes ownership of two connected stream sockets, client and
// server, given as fds the caller duplicated and no longer reads or
// writes. toServer and toClient are bytes the caller had already read from
// one side but not forwarded (read-ahead); they reach their destination
// before anything the kernel moves.
//
// The sequence, and why each step is where it is:
//
//  1. Refuse what the kernel cannot do before touching anything: a client
//     side that is not TCP, a TCP socket that is no longer ESTABLISHED (it
//     already got FIN or a reset, and the kernel refuses to insert such a
//     socket). A unix-socket server side is accepted; the differences for
//     it are noted at each step and in doc.go.
//  2. Insert both sockets into the program-less targets SOCKHASH. This
//     changes nothing about how their bytes flow yet, but it is the
//     kernel's own check that they can be spliced, done before any
//     read-ahead is written (so that a refusal still lets the caller fall
//     back with its read-ahead intact).
//  3. Write the read-ahead fully (waiting for writability up to
//     Options.PendingWriteTimeout), then record each socket's send
//     progress, against which the watcher later decides that everything
//     redirected before a FIN is out.
//  4. Create the per-direction entries (peer cookie, flow-control
//     threshold, hard bound).
//  5. Insert each socket into the verdict SOCKHASH, then set SO_RCVLOWAT
//     to 1 on it so bytes queued before the insertion are run through the
//     program now rather than stranded until the next segment.
//  6. Hand the pair to the watcher.
//
// On error nothing is left in the maps and the fds are still the caller's,
// which can relay them in user space with the same read-ahead; except for
// a *PartialWriteError, which means the streams already changed and the
// caller must close both fds.
//
// onDone is called exactly once, from the watcher goroutine, after the
// map entries are removed and both fds closed. A FIN from one side is
// passed on as shutdown(SHUT_WR) on the other once every byte before it
// is out; a reset or error on either side closes both. A direction whose
// reader falls behind is moved by the watcher until it catches up (flow
// control, Options.FlowThreshold).
func (s *Splicer) Splice(client, server int, toServer, toClient []byte, onDone func(Stats)) error {
	return s.SpliceWithMeta(client, server, toServer, toClient, nil, onDone)
}

// SpliceWithMeta is Splice with meta: opaque bytes the Splicer keeps with
// the session and hands over with it (HandOver), so that the process that
// adopts the session knows what it is (a connection id, the user, the
// database, the client's address, the login time: whatever the caller
// records). The Splicer keeps meta as given; the caller must not change it.
func (s *Splicer) SpliceWithMeta(client, server int, toServer, toClient, meta []byte, onDone func(Stats)) error {
	start := time.Now()
	s.mu.Lock()
	closed, handing := s.closed, s.handing
	if !closed && !handing {
		// HandOver waits for this Splice to finish (register or fail)
		// before it parks the watcher, so no session is half built then.
		s.splicing++
	}
	s.mu.Unlock()
	switch {
	case closed:
		return ErrClosed
	case handing:
		return ErrHandingOver
	}
	defer func() {
		s.mu.Lock()
		if s.splicing--; s.splicing == 0 {
			s.idle.Broadcast()
		}
		s.mu.Unlock()
	}()
	ck, err := kindOf(client)
	if err != nil {
		return fmt.Errorf("bpf: client socket: %w", err)
	}
	sk, err := kindOf(server)
	if err != nil {
		return fmt.Errorf("bpf: server socket: %w", err)
	}
	if !ck.tcp() {
		return errors.New("bpf: the client side is not a TCP stream socket; not spliced")
	}
	unixUp := sk.unixStream()
	if !sk.tcp() && !unixUp {
		return errors.New("bpf: the server side is neither a TCP nor a unix stream socket; not spliced")
	}
	if unixUp && s.obj.noQueues != nil {
		return fmt.Errorf("bpf: a unix-socket upstream is spliced only with the sockmap iterator, and %w; not spliced", s.obj.noQueues)
	}
	for _, fd := range []int{client, server} {
		if err := unix.SetNonblock(fd, true); err != nil {
			return fmt.Errorf("bpf: setting O_NONBLOCK: %w", err)
		}
	}
	var cookies [2]uint64
	for i, fd := range []int{client, server} {
		if cookies[i], err = cookieOf(fd); err != nil {
			return fmt.Errorf("bpf: %s socket cookie: %w", side(i), err)
		}
		if (i == 0 || !unixUp) && !established(fd) {
			return fmt.Errorf("bpf: the %s socket is %w", side(i), ErrNotEstablished)
		}
	}
	ss := &session{fds: [2]int{client, server}, cookies: cookies, start: start, onDone: onDone, unixServer: unixUp, meta: meta}

	// 1. The accounting base of the end-of-session audit (session.audit):
	// before the sockets enter any map, because a TCP socket in a sockmap
	// answers SIOCINQ with its psock's queue, not TCP's (doc.go).
	var rcvBase [2]uint64
	for i, fd := range ss.fds {
		rcvBase[i] = noBase
		if side(i) == sideClient || !unixUp {
			if b, err := receiveBase(fd); err == nil {
				rcvBase[i] = b
			}
		}
	}
	if unixUp {
		// The kernel hands the verdict a unix skb still owned by its
		// sender, the database's end, so that is the key the program
		// finds (measured on 6.18; see doc.go).
		if ss.alt, err = unixPeerCookie(server); err != nil {
			return fmt.Errorf("bpf: finding the database end of the unix socket: %w", err)
		}
	}

	// 2. Redirect targets.
	for i := range 2 {
		if err := s.obj.Targets.Update(cookies[i], uint64(ss.fds[i]), ebpf.UpdateNoExist); err != nil {
			s.unmap(ss)
			return refusedInsert(side(i), ss.fds[i], i == 0 || !unixUp, "one that already received FIN cannot be inserted", err)
		}
	}

	// 3. Read-ahead, then the accounting base. Towards a unix socket the
	// read-ahead waits until that socket is in the verdict map: a unix
	// socket has no SO_RCVLOWAT kick, so a reply to it that arrived before
	// the insertion would sit unseen.
	deadline := start.Add(s.pendingTO)
	var nS, nC int
	var errS, errC error
	if !unixUp {
		nS, errS = writeAll(server, toServer, deadline)
	}
	if errS == nil {
		nC, errC = writeAll(client, toClient, deadline)
	}
	if err := errors.Join(errS, errC); err != nil {
		s.unmap(ss)
		if nS+nC == 0 {
			return fmt.Errorf("bpf: writing the read-ahead: %w", err)
		}
		return &PartialWriteError{ToServer: nS, ToClient: nC, Err: err}
	}
	// partial builds the error for failures from here on: the read-ahead
	// (if any) is out, so the caller cannot replay it.
	partial := func(err error) error {
		s.unmap(ss)
		if nS+nC == 0 {
			return err
		}
		return &PartialWriteError{ToServer: nS, ToClient: nC, Err: err}
	}
	ss.dirs[sideClient] = &direction{src: sideClient, dst: sideServer, pending: uint64(nS)}
	ss.dirs[sideServer] = &direction{src: sideServer, dst: sideClient, pending: uint64(nC)}
	for _, d := range ss.dirs {
		if d.dst == sideServer && unixUp {
			continue // no write_seq; see queueEmpty
		}
		if d.base, err = writeProgress(ss.fds[d.dst]); err != nil {
			return partial(fmt.Errorf("bpf: sampling the %s socket: %w", d.dst, err))
		}
	}

	// 4. Directions. The bytes a unix socket receives are never put under
	// flow control: they are still charged to the database's end while
	// they wait in the redirect queue (a unix skb stays owned by its
	// sender until the kworker has sent it), so the database's own send
	// buffer already bounds that queue, and blocks the database as a
	// direct connection would. Passing them would instead move the charge
	// to the proxy's unix socket, which has no receive limit at all.
	for _, d := range ss.dirs {
		v := spliceDir{Peer: cookies[d.dst], PauseAt: s.flowAt, Limit: s.maxBacklog, Flags: dirTCPSrc}
		if d.src == sideServer && unixUp {
			v.PauseAt, v.Flags = 0, 0
		}
		if err := s.obj.Dirs.Update(cookies[d.src], &v, ebpf.UpdateNoExist); err != nil {
			return partial(fmt.Errorf("bpf: adding the session: %w", err))
		}
		// Created now, only ever updated in place afterwards.
		if err := s.obj.Relayed.Update(cookies[d.src], &spliceRelayed{}, ebpf.UpdateNoExist); err != nil {
			return partial(fmt.Errorf("bpf: adding the session: %w", err))
		}
	}
	if unixUp {
		// Also under the database end's cookie (where this kernel looks).
		v := spliceDir{Peer: cookies[sideClient], Limit: s.maxBacklog}
		if err := s.obj.Dirs.Update(ss.alt, &v, ebpf.UpdateNoExist); err != nil {
			return partial(fmt.Errorf("bpf: adding the session: %w", err))
		}
	}

	// 5. Verdict. Once a socket is in, its bytes may already be on their
	// way to the other, so a failure after that point can no longer be
	// undone. The unix server goes first, then its read-ahead.
	order := []side{sideClient, sideServer}
	if unixUp {
		order = []side{sideServer, sideClient}
	}
	for n, i := range order {
		ss.dirs[i].rcvBase = rcvBase[i]
		if err := s.obj.VerdictSocks.Update(cookies[i], uint64(ss.fds[i]), ebpf.UpdateNoExist); err != nil {
			err = refusedInsert(i, ss.fds[i], i == sideClient || !unixUp, "it may have just received FIN", err)
			if n == 0 {
				return partial(err)
			}
			s.unmap(ss)
			return &PartialWriteError{ToServer: nS, ToClient: nC, Err: err}
		}
		if i == sideServer && unixUp {
			// Bytes the database sent between the login's last read and
			// this insertion would be stranded: the verdict of a unix
			// socket takes one skb per wake-up, so it would lag one
			// message behind for good. They are not expected (the
			// database is idle after ReadyForQuery); refuse if present.
			if q, err := unix.IoctlGetInt(server, unix.SIOCINQ); err != nil || q != 0 {
				s.unmap(ss)
				return &PartialWriteError{ToServer: nS, ToClient: nC,
					Err: fmt.Errorf("bpf: the database sent %d bytes during the handoff (%v)", q, err)}
			}
			if nS, errS = writeAll(server, toServer, deadline); errS != nil {
				s.unmap(ss)
				return &PartialWriteError{ToServer: nS, ToClient: nC, Err: fmt.Errorf("bpf: writing the read-ahead: %w", errS)}
			}
			ss.dirs[sideClient].pending = uint64(nS)
			continue
		}
		if err := rcvlowatKick(ss.fds[i]); err != nil {
			s.unmap(ss)
			return &PartialWriteError{ToServer: nS, ToClient: nC, Err: fmt.Errorf("bpf: SO_RCVLOWAT: %w", err)}
		}
	}

	// 6. Watcher.
	if err := s.register(ss); err != nil {
		s.unmap(ss)
		return &PartialWriteError{ToServer: nS, ToClient: nC, Err: err}
	}
	return nil
}

// unmap removes a session's entries from every map, ignoring the ones that
// are not there.
func (s *Splicer) unmap(ss *session) {
	for _, c := range ss.cookies {
		// Out of the verdict map first, so no further byte is redirected
		// while the others go.
		_ = s.obj.VerdictSocks.Delete(c)
	}
	for _, c := range ss.cookies {
		_ = s.obj.Targets.Delete(c)
		_ = s.obj.Dirs.Delete(c)
		_ = s.obj.Relayed.Delete(c)
	}
	if ss.alt != 0 {
		_ = s.obj.Dirs.Delete(ss.alt)
	}
}

// register hands a fully inserted session to the watcher. The session is
// complete (epoll registration included) before the watcher can find it,
// so the watcher never sees it half built; events that fire before that
// find no session and are dropped, which is why the watcher polls a new
// session's sockets once (see watch, kicked).
func (s *Splicer) register(ss *session) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	for {
		ss.id = s.nextID
		s.nextID++
		if s.nextID < firstSessionID {
			s.nextID = firstSessionID
		}
		if _, taken := s.sessions[ss.id]; !taken {
			break
		}
	}
	s.mu.Unlock()

	// Edge-triggered: later events are reported once per change. The
	// watcher adds EPOLLOUT while it waits to forward a FIN.
	undo := func() {
		for _, fd := range ss.fds {
			_ = unix.EpollCtl(s.ep.FD(), unix.EPOLL_CTL_DEL, fd, nil)
		}
	}
	for i, fd := range ss.fds {
		ss.mask[i] = baseMask
		if err := s.epollAdd(fd, ss.id, int32(i), baseMask); err != nil {
			undo()
			return err
		}
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		undo()
		return ErrClosed
	}
	s.sessions[ss.id] = ss
	for _, c := range ss.cookies {
		s.byCookie[c] = ss
	}
	if ss.alt != 0 {
		s.byCookie[ss.alt] = ss // the program reports unix bytes under it
	}
	s.kicked = append(s.kicked, ss.id)
	s.mu.Unlock()
	s.wake()
	return nil
}

var eventfdOne = []byte{1, 0, 0, 0, 0, 0, 0, 0}

func (s *Splicer) wake() { _, _ = unix.Write(s.wakefd, eventfdOne) }

// refusedInsert explains the kernel's refusal to put a socket into a map.
// The usual cause is a peer that closed between the splice's own check
// and the insertion (a TCP socket past ESTABLISHED cannot enter a
// sockmap: EOPNOTSUPP); when the socket is indeed no longer established
// (tcp: it is a TCP socket), the error wraps ErrNotEstablished too, so
// that callers treat it as the routine case it is.
func refusedInsert(sd side, fd int, tcp bool, hint string, err error) error {
	if tcp && !established(fd) {
		return fmt.Errorf("bpf: the kernel refused the %s socket, %w: %w", sd, ErrNotEstablished, err)
	}
	return fmt.Errorf("bpf: the kernel refused the %s socket (%s): %w", sd, hint, err)
}
