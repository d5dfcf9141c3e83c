package bpf

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bpf/fdpass"
)

// Hand-over: a running Splicer gives its spliced sessions, with the kernel
// objects that splice them, to a Splicer in another process (a new pgmfa
// binary taking over from the old one), without a byte lost, duplicated or
// reordered. See doc.go for the kernel facts it rests on; in short, a
// spliced socket keeps forwarding as long as any process holds a file
// reference to it, so passing the fds over SCM_RIGHTS moves a session, and
// the new process must run the same program on the same maps.
//
// The protocol, over a unix stream socket, is a preamble (magic and
// version) from the old process, then frames (length, fd count, kind,
// JSON payload, with the fds in the same sendmsg):
//
//	old → new  header    the program's hash, the names of the objects; fds: maps, programs
//	old → new  sessions  up to maxSessionsPerFrame sessions; fds: client, server of each
//	old → new  end       the number of sessions sent
//	new → old  ack       everything received and checked (or refuse, with the reason)
//	old → new  commit    (or abort)
//
// Until the commit nothing changes hands: the old watcher is parked (it
// steps no session) and the new process only holds references. So a
// refusal, an error or a timeout on either side before the commit leaves
// the old Splicer running its sessions as before, and the new process
// closes its references, which disturbs nothing (the kernel takes a
// socket out of a sockmap only when its last reference goes). After the
// ack the old process decides alone: it writes commit and drops its
// references, or writes abort and resumes. A new process that reads EOF
// instead of a decision takes the sessions, since only an old process
// that is gone (and has dropped its references) says nothing.

// handOverMagic opens every hand-over; handOverVersion changes with any
// change to the frames or their JSON.
const (
	handOverMagic   = "pgmfaHO\x00"
	handOverVersion = 1
)

// Frame kinds.
const (
	frameHeader byte = 1 + iota
	frameSessions
	frameEnd
	frameAck
	frameRefuse
	frameCommit
	frameAbort
)

// Limits on what a receiver accepts. SCM_RIGHTS carries at most 253 fds
// per message (SCM_MAX_FD), so sessions go in batches of 126 (two fds
// each); a frame holds at most that many sessions' JSON, each with up to
// two relay buffers.
const (
	maxFDsPerFrame      = 253
	maxSessionsPerFrame = maxFDsPerFrame / 2
	maxFramePayload     = 128 << 20
	frameHeaderLen      = 8
)

// handOverTimeout bounds each side's part of a hand-over (until the ack,
// and the wait for the decision after it).
var handOverTimeout = 30 * time.Second

// HandOverReport says what HandOver moved.
type HandOverReport struct {
	// Sessions is the number of sessions handed over.
	Sessions int
	// Relaying counts the directions that were under flow control (the
	// watcher moving their bytes in user space), and Held the bytes it
	// had read from their sources and not yet written: they travel with
	// the hand-over, and the new process writes them first.
	Relaying, Held int
	// Parked is how long no watcher stepped the sessions: from the old
	// watcher's stop to the commit (the new watcher starts right after).
	// The kernel moved their bytes meanwhile; FINs and flow control
	// waited.
	Parked time.Duration
}

type handOverHeader struct {
	Program  string   `json:"program"`             // objectHash of the sender
	Objects  []string `json:"objects"`             // names of the header frame's fds, in order
	NoQueues string   `json:"no_queues,omitempty"` // why the sender had no iterator
	PID      int      `json:"pid"`
	Sessions int      `json:"sessions"`
}

type handOverSession struct {
	Cookies    [2]uint64      `json:"cookies"` // client, server: checked against the fds
	Alt        uint64         `json:"alt,omitempty"`
	Unix       bool           `json:"unix,omitempty"`
	Start      int64          `json:"start"` // unix nanoseconds
	FirstClose string         `json:"first_close,omitempty"`
	Meta       []byte         `json:"meta,omitempty"`
	Dirs       [2]handOverDir `json:"dirs"` // by source: client, server
}

// handOverDir is a direction's user-space state (see direction). The
// kernel's part (struct dir, struct relayed) stays in the maps.
type handOverDir struct {
	Pending    uint64 `json:"pending"`
	Base       uint64 `json:"base"`
	RcvBase    uint64 `json:"rcv_base"`
	Fin        bool   `json:"fin,omitempty"`
	Shut       bool   `json:"shut,omitempty"`
	WaitOut    bool   `json:"wait_out,omitempty"`
	Relaying   bool   `json:"relaying,omitempty"`
	Out        []byte `json:"out,omitempty"` // read from the source, not yet written
	Read       uint64 `json:"read"`
	Written    uint64 `json:"written"`
	PubRead    uint64 `json:"published_read"`
	PubWritten uint64 `json:"published_written"`
	Cleared    uint64 `json:"cleared"`
}

type handOverCount struct {
	Sessions int    `json:"sessions"`
	Error    string `json:"error,omitempty"`
}

// HandOver gives every spliced session, and the kernel objects, to the
// process at the other end of conn (a unix stream socket), which calls
// Adopt. It stops Splice
// (ErrHandingOver) and waits for the calls under way, parks the watcher
// between two steps, sends the objects and the sessions with their
// user-space state (including bytes a direction under flow control has
// read and not written), and waits for the receiver's ack. Then it
// commits: it drops its own references to everything (never reading,
// shutting down or unmapping a socket) and the Splicer is closed, without
// calling any session's onDone. On an error before the commit nothing
// has changed: the watcher resumes and the Splicer runs on.
func (s *Splicer) HandOver(conn *net.UnixConn) (HandOverReport, error) {
	if err := streamConn(conn); err != nil {
		return HandOverReport{}, err
	}
	s.life.Lock()
	defer s.life.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return HandOverReport{}, ErrClosed
	}
	s.handing = true
	for s.splicing > 0 {
		s.idle.Wait()
	}
	p := &parkReq{parked: make(chan struct{}), handed: make(chan bool, 1)}
	s.park = p
	s.mu.Unlock()
	s.wake()
	select {
	case <-p.parked:
	case <-s.done:
		return HandOverReport{}, errors.New("bpf: the sockmap watcher has stopped (see the log); nothing handed over")
	}
	// The watcher is parked: its sessions are ours to read until we answer.
	parked := time.Now()
	rep, err := s.handOver(conn)
	rep.Parked = time.Since(parked)
	if err != nil {
		s.mu.Lock()
		s.handing = false
		s.mu.Unlock()
		p.handed <- false
		return rep, fmt.Errorf("bpf: hand-over failed, the sessions stay here: %w", err)
	}
	s.mu.Lock()
	s.closed, s.handing = true, false
	sessions := s.sessions
	s.sessions, s.byCookie = map[uint32]*session{}, map[uint64]*session{}
	s.mu.Unlock()
	p.handed <- true
	<-s.done
	s.obj.attached = false // the program stays attached for the new process
	err = s.release()
	for _, ss := range sessions {
		for _, fd := range ss.fds {
			unix.Close(fd)
		}
		for _, d := range ss.dirs {
			if d.buf != nil {
				relayBufs.Put(d.buf)
				d.buf, d.out = nil, nil
			}
		}
	}
	if err != nil {
		return rep, fmt.Errorf("bpf: sessions handed over; closing this process's references: %w", err)
	}
	return rep, nil
}

// handOver runs the old process's side of the protocol up to the
// decision, which it writes: nil means the commit was written.
func (s *Splicer) handOver(conn *net.UnixConn) (rep HandOverReport, err error) {
	if err := conn.SetDeadline(time.Now().Add(handOverTimeout)); err != nil {
		return rep, err
	}
	defer conn.SetDeadline(time.Time{})
	all := s.snapshot()
	committed := false
	defer func() {
		if !committed {
			// Best effort: a receiver that is gone needs no word.
			_ = writeFrame(conn, frameAbort, nil, nil)
		}
	}()
	names, fds := s.obj.handed()
	hdr := handOverHeader{Program: objectHash(), Objects: names, PID: os.Getpid(), Sessions: len(all)}
	if s.obj.noQueues != nil {
		hdr.NoQueues = s.obj.noQueues.Error()
	}
	pre := binary.BigEndian.AppendUint32([]byte(handOverMagic), handOverVersion)
	if _, err := conn.Write(pre); err != nil {
		return rep, fmt.Errorf("writing the preamble: %w", err)
	}
	if err := writeJSON(conn, frameHeader, &hdr, fds); err != nil {
		return rep, err
	}
	for len(all) > 0 {
		batch := all[:min(len(all), maxSessionsPerFrame)]
		all = all[len(batch):]
		out := make([]handOverSession, len(batch))
		fds = fds[:0]
		for i, ss := range batch {
			out[i] = ss.handedOver(&rep)
			fds = append(fds, ss.fds[0], ss.fds[1])
		}
		if err := writeJSON(conn, frameSessions, out, fds); err != nil {
			return rep, err
		}
	}
	if err := writeJSON(conn, frameEnd, &handOverCount{Sessions: rep.Sessions}, nil); err != nil {
		return rep, err
	}
	r := newFrameReader(conn)
	defer r.closeFDs() // a receiver sends none
	kind, payload, _, err := r.frame(0)
	if err != nil {
		return rep, fmt.Errorf("waiting for the receiver's answer: %w", err)
	}
	var ans handOverCount
	if err := json.Unmarshal(payload, &ans); err != nil {
		return rep, fmt.Errorf("the receiver's answer: %w", err)
	}
	switch {
	case kind == frameRefuse:
		return rep, fmt.Errorf("the receiver refused: %s", ans.Error)
	case kind != frameAck:
		return rep, fmt.Errorf("the receiver answered with frame kind %d, not an ack", kind)
	case ans.Sessions != rep.Sessions:
		return rep, fmt.Errorf("the receiver acknowledged %d sessions of %d", ans.Sessions, rep.Sessions)
	}
	// A write to a unix socket fails only when the receiver has closed
	// it, and then it holds no reference any more: resuming is right.
	if err := writeFrame(conn, frameCommit, nil, nil); err != nil {
		return rep, fmt.Errorf("writing the commit: %w", err)
	}
	committed = true
	return rep, nil
}

// handedOver describes a session for the hand-over and counts it in rep.
func (ss *session) handedOver(rep *HandOverReport) handOverSession {
	rep.Sessions++
	h := handOverSession{Cookies: ss.cookies, Alt: ss.alt, Unix: ss.unixServer, Start: ss.start.UnixNano(),
		FirstClose: ss.firstClose, Meta: ss.meta}
	for i, d := range ss.dirs {
		h.Dirs[i] = handOverDir{Pending: d.pending, Base: d.base, RcvBase: d.rcvBase, Fin: d.fin, Shut: d.shut,
			WaitOut: d.waitOut, Relaying: d.buf != nil, Out: d.out, Read: d.uread, Written: d.uwrite,
			PubRead: d.published.Read, PubWritten: d.published.Written, Cleared: d.cleared}
		if d.buf != nil {
			rep.Relaying++
			rep.Held += len(d.out)
		}
	}
	return h
}

// Adopt receives a hand-over (HandOver in another process) on conn and
// returns a running Splicer that owns the old process's kernel objects and
// every session it had, each registered with the new watcher as it was
// left. opts configure the sessions spliced from now on; an adopted
// session keeps the flow-control threshold and bound it was spliced with
// (they are in the maps). onDone, if not nil, is called once per adopted
// session before the watcher follows it, with the meta the old process
// gave it (SpliceWithMeta) and the session's Live, and returns the
// session's onDone (nil: none).
//
// If conn does not carry a pgmfa hand-over of this version, or carries
// objects of another BPF program, Adopt refuses with an error saying so
// and closes whatever it received; the sender keeps its sessions. Nothing
// is loaded or attached here: the program stays attached as the first
// process attached it, and this Splicer detaches it on Close.
func Adopt(conn *net.UnixConn, opts Options, onDone func(meta []byte, live Live) func(Stats)) (*Splicer, error) {
	if err := streamConn(conn); err != nil {
		return nil, err
	}
	if err := conn.SetDeadline(time.Now().Add(handOverTimeout)); err != nil {
		return nil, err
	}
	defer conn.SetDeadline(time.Time{})
	r := newFrameReader(conn)
	defer r.closeFDs() // whatever was received and not claimed
	s := newShell(opts)
	var ss []*session
	refuse := func(err error) (*Splicer, error) {
		b, _ := json.Marshal(&handOverCount{Error: err.Error()})
		_ = writeFrame(conn, frameRefuse, b, nil)
		for _, x := range ss {
			unix.Close(x.fds[0])
			unix.Close(x.fds[1])
		}
		if s.obj != nil {
			s.obj.attached = false // never detach what the sender still runs
			s.release()
		}
		return nil, fmt.Errorf("bpf: adopting a hand-over: %w", err)
	}
	err := receiveHandOver(r, func(h *handOverHeader, fds []int) error {
		var err error
		s.obj, err = adopt(h.Objects, fds, h.NoQueues)
		if err != nil {
			s.obj = nil
			return err
		}
		return s.open()
	}, func(h *handOverSession, fds [2]int) error {
		x, err := adoptedSession(h, fds)
		if err != nil {
			return err
		}
		ss = append(ss, x)
		return nil
	})
	if err != nil {
		return refuse(err)
	}
	b, _ := json.Marshal(&handOverCount{Sessions: len(ss)})
	if err := writeFrame(conn, frameAck, b, nil); err != nil {
		return refuse(fmt.Errorf("writing the ack: %w", err))
	}
	// The decision. The sender writes one at once; it is silent only if
	// it has died, and then its references are gone and ours keep the
	// sessions alive: take them. A timeout means a sender that is alive
	// and stuck, still holding its sessions: leave them to it.
	if err := conn.SetDeadline(time.Now().Add(2 * handOverTimeout)); err != nil {
		return refuse(err)
	}
	kind, _, _, err := r.frame(0)
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
	case err != nil:
		return refuse(fmt.Errorf("waiting for the sender's decision: %w", err))
	case kind == frameAbort:
		return refuse(errors.New("the sender aborted the hand-over"))
	case kind != frameCommit:
		return refuse(fmt.Errorf("the sender decided with frame kind %d, neither commit nor abort", kind))
	}
	// Committed: the sessions are ours. Register them all before the
	// watcher starts; each is looked at once (pollNew) as it starts.
	for _, x := range ss {
		if onDone != nil {
			x.onDone = onDone(x.meta, Live{s: s, cookie: x.cookies[0]})
		}
		if err := s.register(x); err != nil {
			// Only an epoll failure: nobody could watch it, so end it.
			s.unmap(x)
			unix.Close(x.fds[0])
			unix.Close(x.fds[1])
			if x.onDone != nil {
				x.onDone(Stats{Reason: "proxy error: adopting the session: " + err.Error(), Duration: time.Since(x.start)})
			}
		}
	}
	go s.watch()
	return s, nil
}

// streamConn checks that conn is a unix stream socket, the one kind the
// protocol is framed for (a datagram or seqpacket socket would cut frames
// at the reader's buffer size).
func streamConn(conn *net.UnixConn) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	typ := -1
	if cerr := rc.Control(func(fd uintptr) { typ, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_TYPE) }); cerr != nil {
		return cerr
	}
	if err != nil {
		return err
	}
	if typ != unix.SOCK_STREAM {
		return errors.New("bpf: a hand-over needs a unix stream socket")
	}
	return nil
}

// adoptedSession rebuilds a session from its hand-over, with the fds
// received for it (checked against the cookies announced).
func adoptedSession(h *handOverSession, fds [2]int) (*session, error) {
	for i, fd := range fds {
		c, err := cookieOf(fd)
		if err != nil {
			return nil, fmt.Errorf("a session's %s fd is not a socket: %w", side(i), err)
		}
		if c != h.Cookies[i] {
			return nil, fmt.Errorf("a session's %s socket has cookie %d, the hand-over announced %d", side(i), c, h.Cookies[i])
		}
	}
	ss := &session{fds: fds, cookies: h.Cookies, alt: h.Alt, unixServer: h.Unix, start: time.Unix(0, h.Start),
		firstClose: h.FirstClose, meta: h.Meta}
	for i, hd := range h.Dirs {
		if len(hd.Out) > relayBufSize || len(hd.Out) > 0 && !hd.Relaying {
			return nil, fmt.Errorf("a session's %s direction carries %d held bytes (relaying %v)", side(i), len(hd.Out), hd.Relaying)
		}
		d := &direction{src: side(i), dst: side(1 - i), pending: hd.Pending, base: hd.Base, rcvBase: hd.RcvBase,
			fin: hd.Fin, shut: hd.Shut, waitOut: hd.WaitOut, uread: hd.Read, uwrite: hd.Written,
			published: spliceRelayed{Read: hd.PubRead, Written: hd.PubWritten}, cleared: hd.Cleared}
		if hd.Relaying {
			d.buf = relayBufs.Get().(*[]byte)
			d.out = (*d.buf)[:copy(*d.buf, hd.Out)]
		}
		ss.dirs[i] = d
	}
	return ss, nil
}

// receiveHandOver reads a hand-over up to its end frame, checking it as it
// goes: objects receives the header's fds (and owns them), session each
// session's two fds (and owns them once it returns nil). It has no other
// effect, which is what FuzzReceiveHandOver relies on.
func receiveHandOver(r *frameReader, objects func(*handOverHeader, []int) error, session func(*handOverSession, [2]int) error) error {
	if err := r.preamble(); err != nil {
		return err
	}
	kind, payload, fds, err := r.frame(-1)
	if err != nil {
		return err
	}
	if kind != frameHeader {
		fdpass.CloseAll(fds)
		return fmt.Errorf("the hand-over starts with frame kind %d, not a header", kind)
	}
	var hdr handOverHeader
	if err := fdpass.StrictJSON(payload, &hdr); err != nil {
		fdpass.CloseAll(fds)
		return fmt.Errorf("the hand-over's header: %w", err)
	}
	if hdr.Program != objectHash() {
		fdpass.CloseAll(fds)
		return fmt.Errorf("the sender runs another BPF program (%q; this binary's is %q): a hand-over needs the same splice.c on both sides", hdr.Program, objectHash())
	}
	if hdr.Sessions < 0 {
		fdpass.CloseAll(fds)
		return fmt.Errorf("the header announces %d sessions", hdr.Sessions)
	}
	if err := objects(&hdr, fds); err != nil {
		return err
	}
	got := 0
	for {
		kind, payload, fds, err := r.frame(-1)
		if err != nil {
			return err
		}
		switch kind {
		case frameSessions:
			var batch []handOverSession
			if err := fdpass.StrictJSON(payload, &batch); err != nil {
				fdpass.CloseAll(fds)
				return fmt.Errorf("a frame of sessions: %w", err)
			}
			if len(fds) != 2*len(batch) {
				fdpass.CloseAll(fds)
				return fmt.Errorf("a frame of %d sessions carries %d fds", len(batch), len(fds))
			}
			for i := range batch {
				if err := session(&batch[i], [2]int{fds[2*i], fds[2*i+1]}); err != nil {
					fdpass.CloseAll(fds[2*i:])
					return err
				}
			}
			got += len(batch)
			if got > hdr.Sessions {
				return fmt.Errorf("more sessions than the %d the header announced", hdr.Sessions)
			}
		case frameEnd:
			fdpass.CloseAll(fds)
			var end handOverCount
			if err := fdpass.StrictJSON(payload, &end); err != nil {
				return fmt.Errorf("the end frame: %w", err)
			}
			if end.Sessions != got || got != hdr.Sessions {
				return fmt.Errorf("received %d sessions, the sender counted %d and announced %d", got, end.Sessions, hdr.Sessions)
			}
			return nil
		case frameAbort:
			fdpass.CloseAll(fds)
			return errors.New("the sender aborted the hand-over")
		default:
			fdpass.CloseAll(fds)
			return fmt.Errorf("unexpected frame kind %d in the hand-over", kind)
		}
	}
}

// writeJSON writes a frame whose payload is v in JSON.
func writeJSON(conn *net.UnixConn, kind byte, v any, fds []int) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return writeFrame(conn, kind, b, fds)
}

// writeFrame writes one frame, its fds attached to its first byte (in the
// same sendmsg). A unix stream socket may take a long frame in parts; the
// fds travel with the first.
func writeFrame(conn *net.UnixConn, kind byte, payload []byte, fds []int) error {
	if len(fds) > maxFDsPerFrame {
		return fmt.Errorf("%d fds in one frame (at most %d)", len(fds), maxFDsPerFrame)
	}
	b := make([]byte, frameHeaderLen, frameHeaderLen+len(payload))
	binary.BigEndian.PutUint32(b, uint32(len(payload)))
	binary.BigEndian.PutUint16(b[4:], uint16(len(fds)))
	b[6] = kind
	b = append(b, payload...)
	if err := fdpass.Send(conn, b, fds); err != nil {
		return fmt.Errorf("writing a hand-over frame: %w", err)
	}
	return nil
}

// frameReader reads hand-over frames and the fds that come with them.
type frameReader struct {
	recv func(p, oob []byte) (n, oobn, flags int, err error)
	buf  []byte // received, not yet consumed
	fds  []int  // received, not yet claimed by a frame
	tmp  []byte
	oob  []byte
}

func newFrameReader(conn *net.UnixConn) *frameReader {
	return &frameReader{recv: func(p, oob []byte) (int, int, int, error) {
		// Go passes MSG_CMSG_CLOEXEC on Linux: received fds are
		// close-on-exec.
		n, oobn, flags, _, err := conn.ReadMsgUnix(p, oob)
		return n, oobn, flags, err
	}, tmp: make([]byte, 64<<10), oob: make([]byte, unix.CmsgSpace(4*maxFDsPerFrame))}
}

// fill receives until buf holds n bytes.
func (r *frameReader) fill(n int) error {
	for len(r.buf) < n {
		got, oobn, flags, err := r.recv(r.tmp, r.oob)
		if oobn > 0 {
			fds, perr := fdpass.Rights(r.oob[:oobn])
			if perr != nil {
				return fmt.Errorf("control message: %w", perr)
			}
			r.fds = append(r.fds, fds...)
		}
		if flags&unix.MSG_CTRUNC != 0 {
			return errors.New("the sender passed more fds in one message than SCM_RIGHTS carries (control data truncated)")
		}
		r.buf = append(r.buf, r.tmp[:max(got, 0)]...)
		switch {
		case err != nil && !errors.Is(err, io.EOF):
			return err
		case got == 0 && oobn == 0:
			if len(r.buf) == 0 {
				return io.EOF
			}
			return fmt.Errorf("the peer closed in the middle of a frame: %w", io.ErrUnexpectedEOF)
		}
	}
	return nil
}

// preamble checks the magic and the version, failing as soon as the first
// bytes differ from the magic.
func (r *frameReader) preamble() error {
	for len(r.buf) < len(handOverMagic) {
		have := len(r.buf)
		if err := r.fill(have + 1); err != nil {
			if have == 0 && errors.Is(err, io.EOF) {
				return errors.New("not a pgmfa hand-over: the peer closed without sending anything")
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("not a pgmfa hand-over: the peer closed after %q", r.buf)
			}
			return fmt.Errorf("not a pgmfa hand-over: %w", err)
		}
		if n := min(len(r.buf), len(handOverMagic)); string(r.buf[:n]) != handOverMagic[:n] {
			return fmt.Errorf("not a pgmfa hand-over: it starts with %q", r.buf[:min(len(r.buf), 32)])
		}
	}
	if err := r.fill(len(handOverMagic) + 4); err != nil {
		return fmt.Errorf("a pgmfa hand-over without its version: %w", err)
	}
	if v := binary.BigEndian.Uint32(r.buf[len(handOverMagic):]); v != handOverVersion {
		return fmt.Errorf("a pgmfa hand-over of version %d; this pgmfa speaks version %d (both binaries must be of the same hand-over version)", v, handOverVersion)
	}
	r.buf = r.buf[len(handOverMagic)+4:]
	return nil
}

// frame reads one frame. want is the number of fds it must carry, or -1
// for any; the fds are the caller's.
func (r *frameReader) frame(want int) (kind byte, payload []byte, fds []int, err error) {
	if err := r.fill(frameHeaderLen); err != nil {
		return 0, nil, nil, err
	}
	n := binary.BigEndian.Uint32(r.buf)
	nfds := int(binary.BigEndian.Uint16(r.buf[4:]))
	kind = r.buf[6]
	switch {
	case n > maxFramePayload:
		return 0, nil, nil, fmt.Errorf("a frame of %d bytes (at most %d)", n, maxFramePayload)
	case nfds > maxFDsPerFrame || want >= 0 && nfds != want:
		return 0, nil, nil, fmt.Errorf("a frame announcing %d fds", nfds)
	}
	if err := r.fill(frameHeaderLen + int(n)); err != nil {
		return 0, nil, nil, err
	}
	payload = r.buf[frameHeaderLen : frameHeaderLen+int(n)]
	r.buf = r.buf[frameHeaderLen+int(n):]
	// The fds of a frame arrive with its first byte, so they are here.
	if len(r.fds) < nfds {
		return 0, nil, nil, fmt.Errorf("a frame announcing %d fds came with %d", nfds, len(r.fds))
	}
	fds, r.fds = r.fds[:nfds:nfds], r.fds[nfds:]
	return kind, payload, fds, nil
}

// closeFDs closes the fds received and not claimed.
func (r *frameReader) closeFDs() {
	fdpass.CloseAll(r.fds)
	r.fds = nil
}
