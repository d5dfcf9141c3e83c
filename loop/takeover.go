package loop

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/bpf/fdpass"
	"github.com/pgmfa/pgmfa/loop/login"
)

// Takeover: a new pgmfa process takes the place of a running one (an
// upgrade, a restart) without a login refused or a spliced session
// dropped. The running process listens on a unix socket (ServeTakeovers);
// the new one connects (TakeOver) and:
//
//  1. asks, naming the addresses it would listen on, which must be the
//     running process's own;
//  2. receives the listening sockets themselves (their fds over
//     SCM_RIGHTS) and accepts on them at once (Run), while the old process
//     stops accepting. The sockets never close — closing a listener
//     resets the connections in its accept queue (bpf/doc.go) — so a
//     client connecting meanwhile waits in the queue, and is never
//     refused;
//  3. while the logins in flight in the old process finish there (as in
//     a drain), serves new logins itself;
//  4. adopts the old process's Splicers with their sessions (bpf.Adopt,
//     Takeover.Adopt), each carried with what the old process knew of it
//     (sessionMeta): they are listed, counted, cancelled and logged here
//     from then on.
//
// The old process then drains what it cannot hand over (sessions in the
// user-space relay and TLS sessions, whose state lives in its memory) as
// SIGTERM does, and exits. Until a Splicer is handed over nothing is
// lost by giving up: a failure before that (a peer that is not a pgmfa, a
// new process that dies) leaves the old process accepting on its
// listeners again, with every session.
//
// The wire: each side starts with takeoverMagic, then frames of a length
// (4 bytes) and a JSON takeoverMsg, with fds (the listeners) in the same
// sendmsg as a frame's first byte. Between two frames of ours, the bytes
// of a bpf hand-over (its own protocol) may pass; each side reads exactly
// its frames, so neither protocol reads the other's bytes.

const (
	takeoverMagic   = "pgmfaTO\x00"
	takeoverVersion = 1
	// takeoverTimeout bounds a wait for the peer's next frame, except the
	// wait for the logins in flight (up to the drain timeout).
	takeoverTimeout = 30 * time.Second
	maxTakeoverMsg  = 1 << 20
)

// takeoverMsg is every frame of the takeover protocol; each uses a few
// fields.
type takeoverMsg struct {
	// new → old, first: the request.
	Version int      `json:"version,omitempty"`
	Listen  []string `json:"listen,omitempty"` // and old → new: the listeners that come with the frame, in order
	PID     int      `json:"pid,omitempty"`
	// old → new: the listeners (fds), and where connection ids go on.
	NextID uint64 `json:"next_id,omitempty"`
	// old → new: a Splicer's bpf hand-over follows; or every one is
	// handed over (Done).
	Splicer bool `json:"splicer,omitempty"`
	Done    bool `json:"done,omitempty"`
	// Answers either way.
	OK    bool   `json:"ok,omitempty"`
	Error string `json:"error,omitempty"`
}

// sessionMeta is what a spliced session carries to the process that
// adopts it (bpf.SpliceWithMeta).
type sessionMeta struct {
	ID       uint64 `json:"id"`
	User     string `json:"user"`
	Database string `json:"database"`
	Client   string `json:"client"`
	Since    int64  `json:"since"` // the handoff, unix nanoseconds
	// The database's cancel key, as the client received it: cancels keep
	// reaching the session's backend through the new process.
	KeyPID    uint32 `json:"key_pid,omitempty"`
	KeySecret []byte `json:"key_secret,omitempty"`
}

func encodeMeta(id uint64, user, database, client string, since time.Time, key *pgproto3.BackendKeyData) []byte {
	m := sessionMeta{ID: id, User: user, Database: database, Client: client, Since: since.UnixNano()}
	if key != nil {
		m.KeyPID, m.KeySecret = key.ProcessID, key.SecretKey
	}
	b, _ := json.Marshal(&m)
	return b
}

func decodeMeta(b []byte) (sessionMeta, error) {
	var m sessionMeta
	err := json.Unmarshal(b, &m)
	return m, err
}

// writeMsg writes one frame (with fds, if any).
func writeMsg(conn *net.UnixConn, m *takeoverMsg, fds []int) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	b = append(binary.BigEndian.AppendUint32(nil, uint32(len(b))), b...)
	return fdpass.Send(conn, b, fds)
}

// readMsg reads exactly one frame, and the fds that came with it (at most
// maxFDs; more are closed and make it an error).
func readMsg(conn *net.UnixConn, maxFDs int) (*takeoverMsg, []int, error) {
	var hdr [4]byte
	oob := make([]byte, unix.CmsgSpace(4*max(maxFDs, 1)))
	var fds []int
	got := 0
	for got < len(hdr) {
		n, oobn, flags, _, err := conn.ReadMsgUnix(hdr[got:], oob)
		if oobn > 0 {
			f, _ := fdpass.Rights(oob[:oobn])
			fds = append(fds, f...)
		}
		if flags&unix.MSG_CTRUNC != 0 || len(fds) > maxFDs {
			fdpass.CloseAll(fds)
			return nil, nil, errors.New("the peer passed more descriptors than the takeover carries")
		}
		got += n
		if err != nil || n == 0 {
			fdpass.CloseAll(fds)
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, nil, err
		}
	}
	m, err := parseMsg(conn, binary.BigEndian.Uint32(hdr[:]))
	if err != nil {
		fdpass.CloseAll(fds)
		return nil, nil, err
	}
	return m, fds, nil
}

func parseMsg(r io.Reader, n uint32) (*takeoverMsg, error) {
	if n > maxTakeoverMsg {
		return nil, fmt.Errorf("a takeover frame of %d bytes (at most %d)", n, maxTakeoverMsg)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	var m takeoverMsg
	if err := fdpass.StrictJSON(b, &m); err != nil {
		return nil, fmt.Errorf("a takeover frame: %w", err)
	}
	return &m, nil
}

// readMagic checks that the peer speaks this protocol.
func readMagic(conn *net.UnixConn) error {
	b := make([]byte, len(takeoverMagic))
	n, err := io.ReadFull(conn, b)
	if n > 0 && string(b[:n]) != takeoverMagic[:n] {
		return fmt.Errorf("not a pgmfa takeover socket: the peer sent %q", b[:n])
	}
	if err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return errors.New("not a pgmfa takeover socket: the peer closed without a word")
		}
		return fmt.Errorf("not a pgmfa takeover socket: %w", err)
	}
	return nil
}

func writeMagic(conn *net.UnixConn) error {
	_, err := conn.Write([]byte(takeoverMagic))
	return err
}

// The running (old) process's side.

// ServeTakeovers lets a new pgmfa process take this one's place through
// ln (see above): it serves one successor at a time and returns once one
// has taken over (this server is then drained, for up to drainTimeout,
// and stopped) or ln is closed. Only a peer of this process's effective
// uid, or root, is heard. A failed takeover is logged, and this server
// serves on.
func (s *Server) ServeTakeovers(ln *net.UnixListener, drainTimeout time.Duration) {
	<-s.booted
	if s.bootErr != nil {
		return
	}
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Error("takeover socket failed; no successor can take over", "err", err)
			}
			return
		}
		committed, err := s.handTakeover(conn, drainTimeout)
		conn.Close()
		if err != nil && !committed {
			s.log.Error("takeover failed; this process serves on as before", "err", err)
			continue
		}
		if err != nil {
			s.log.Error("takeover partly failed after sessions were handed over; draining the rest", "err", err)
		}
		ln.SetUnlinkOnClose(false) // the path is the successor's now
		ln.Close()
		s.drain(drainTimeout)
		return
	}
}

// handTakeover runs one takeover: committed says whether sessions went to
// the new process (this one must then go).
func (s *Server) handTakeover(conn *net.UnixConn, drainTimeout time.Duration) (committed bool, err error) {
	uid, pid, err := peerCred(conn)
	if err != nil {
		return false, err
	}
	if uid != os.Geteuid() && uid != 0 {
		return false, fmt.Errorf("refused a peer of uid %d (pid %d): only uid %d or root may take over", uid, pid, os.Geteuid())
	}
	_ = conn.SetDeadline(time.Now().Add(takeoverTimeout))
	if err := readMagic(conn); err != nil {
		return false, err
	}
	req, fds, err := readMsg(conn, 0)
	if err != nil {
		return false, fmt.Errorf("reading the request: %w", err)
	}
	fdpass.CloseAll(fds)
	refuse := func(err error) (bool, error) {
		_ = writeMagic(conn)
		_ = writeMsg(conn, &takeoverMsg{Error: err.Error()}, nil)
		return false, err
	}
	switch {
	case req.Version != takeoverVersion:
		return refuse(fmt.Errorf("a takeover of version %d; this pgmfa speaks version %d", req.Version, takeoverVersion))
	case !slices.Equal(req.Listen, s.addrs):
		return refuse(fmt.Errorf("the new process would listen on %v, this one listens on %v: a takeover keeps the listeners", req.Listen, s.addrs))
	case !s.startTakeover():
		return refuse(errors.New("this process is draining or stopping"))
	}
	s.log.Info("takeover: a new process is taking over; handing it the listeners", "pid", pid)
	defer s.endTakeover()
	files, err := s.listenerFiles()
	if err != nil {
		s.resumeAfterTakeover()
		return refuse(err)
	}
	resume := func(err error) (bool, error) {
		if s.acc.resume(fileListeners(files)) {
			s.log.Info("takeover: accepting again on the listeners")
		}
		s.resumeAfterTakeover()
		return false, err
	}
	s.acc.pause()
	// Ids handed out before the pause and those of connections still on
	// their way into gnet (at most acceptInFlight) stay below next_id.
	hello := &takeoverMsg{Listen: s.addrs, PID: os.Getpid(), NextID: s.nextID.Load() + acceptInFlight}
	fdList := make([]int, len(files))
	for i, f := range files {
		fdList[i] = int(f.Fd())
	}
	if err := writeMagic(conn); err != nil {
		return resume(err)
	}
	if err := writeMsg(conn, hello, fdList); err != nil {
		return resume(fmt.Errorf("sending the listeners: %w", err))
	}
	if ans, _, err := readMsg(conn, 0); err != nil || !ans.OK {
		if err == nil {
			err = fmt.Errorf("the new process refused the listeners: %s", ans.Error)
		}
		return resume(err)
	}
	s.log.Info("takeover: the new process accepts on the listeners; waiting for the logins in flight here", "logins", s.loginsInFlight())
	_ = conn.SetDeadline(time.Time{})
	deadline := time.Now().Add(drainTimeout)
	for s.loginsInFlight() > 0 && time.Now().Before(deadline) {
		time.Sleep(drainPoll)
	}
	if s.loginsInFlight() > 0 {
		s.log.Info("takeover: logins still in flight at the drain timeout refused", "logins", s.refuseLogins())
	}
	s.adoptMu.Lock()
	splicers := slices.Clone(s.adopted)
	s.adoptMu.Unlock()
	if s.splicer != nil {
		splicers = append([]*bpf.Splicer{s.splicer}, splicers...)
	}
	handed := 0
	for _, sp := range splicers {
		_ = conn.SetDeadline(time.Now().Add(3 * takeoverTimeout))
		if err := writeMsg(conn, &takeoverMsg{Splicer: true}, nil); err != nil {
			return s.takeoverFailed(committed, resume, err)
		}
		rep, err := sp.HandOver(conn)
		if err != nil {
			return s.takeoverFailed(committed, resume, err)
		}
		committed = true
		gone := s.sessions.handedOver(sp)
		for _, ls := range gone {
			ls.handedOver()
		}
		handed += len(gone)
		s.log.Info("takeover: spliced sessions handed over", "sessions", rep.Sessions, "relaying", rep.Relaying,
			"held_bytes", rep.Held, "parked", rep.Parked.Round(time.Millisecond), "conns", ids(infosOf(gone)))
		if ans, _, err := readMsg(conn, 0); err != nil || !ans.OK {
			if err == nil {
				err = errors.New(ans.Error)
			}
			return true, fmt.Errorf("the new process adopted the sessions but did not confirm: %w", err)
		}
	}
	if err := writeMsg(conn, &takeoverMsg{Done: true}, nil); err != nil {
		return s.takeoverFailed(committed, resume, err)
	}
	for _, f := range files {
		f.Close()
	}
	s.handedListeners.Store(true)
	s.log.Info("takeover complete: the new process owns the listeners and the spliced sessions; draining the relayed and TLS sessions here",
		"sessions_handed_over", handed, "sessions_left", len(s.Sessions()))
	return true, nil
}

// startTakeover marks the server draining for a takeover, unless it is
// draining already.
func (s *Server) startTakeover() bool {
	s.tkMu.Lock()
	defer s.tkMu.Unlock()
	if !s.draining.CompareAndSwap(false, true) {
		return false
	}
	s.takingOver, s.drainAsked = true, -1
	return true
}

// resumeAfterTakeover ends a failed takeover: the server is no longer
// draining, unless a Drain was asked meanwhile, which runs now.
func (s *Server) resumeAfterTakeover() {
	s.tkMu.Lock()
	d := s.drainAsked
	s.takingOver, s.drainAsked = false, -1
	if d < 0 {
		s.draining.Store(false)
	}
	s.tkMu.Unlock()
	if d >= 0 {
		go s.drain(d)
	}
}

// endTakeover ends a takeover that went through (or was resumed).
func (s *Server) endTakeover() {
	s.tkMu.Lock()
	s.takingOver = false
	s.tkMu.Unlock()
}

// takeoverFailed ends a takeover that failed at a Splicer's hand-over:
// before any commit this process takes its listeners back; after one the
// new process has them and sessions, and this one goes.
func (s *Server) takeoverFailed(committed bool, resume func(error) (bool, error), err error) (bool, error) {
	if !committed {
		return resume(err)
	}
	s.handedListeners.Store(true)
	return true, err
}

func infosOf(ls []*liveSession) []SessionInfo {
	out := make([]SessionInfo, len(ls))
	for i, l := range ls {
		out[i] = l.info
	}
	return out
}

// listenerFiles duplicates the listeners' fds (and keeps a unix listener's
// path when Go closes it: the socket lives on in the new process).
func (s *Server) listenerFiles() ([]*os.File, error) {
	var files []*os.File
	for _, ln := range s.acc.lns {
		if ul, ok := ln.(*net.UnixListener); ok {
			ul.SetUnlinkOnClose(false)
		}
		fl, ok := ln.(interface{ File() (*os.File, error) })
		if !ok {
			return nil, fmt.Errorf("listener %s cannot be handed over", ln.Addr())
		}
		f, err := fl.File()
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, err
		}
		files = append(files, f)
	}
	return files, nil
}

// fileListeners turns listener fds back into listeners (closing the
// files).
func fileListeners(files []*os.File) []net.Listener {
	var lns []net.Listener
	for _, f := range files {
		ln, err := net.FileListener(f)
		f.Close()
		if err == nil {
			lns = append(lns, ln)
		}
	}
	return lns
}

func peerCred(conn *net.UnixConn) (uid, pid int, err error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return 0, 0, err
	}
	if cerr != nil {
		return 0, 0, cerr
	}
	return int(cred.Uid), int(cred.Pid), nil
}

// The new process's side.

// Takeover is a takeover under way, in the new process.
type Takeover struct {
	conn *net.UnixConn
	pid  int
}

// TakeOver connects to the running pgmfa's takeover socket at path and
// receives its listeners, before Run (which then accepts on them instead
// of binding its own). Then Takeover.Adopt takes the sessions. An error
// here leaves the running process as it was.
func (s *Server) TakeOver(path string) (*Takeover, error) {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("no pgmfa listens on the takeover socket %s: %w", path, err)
	}
	fail := func(err error) (*Takeover, error) {
		conn.Close()
		return nil, fmt.Errorf("taking over through %s: %w", path, err)
	}
	_ = conn.SetDeadline(time.Now().Add(takeoverTimeout))
	err = writeMagic(conn)
	if err == nil {
		err = writeMsg(conn, &takeoverMsg{Version: takeoverVersion, Listen: s.addrs, PID: os.Getpid()}, nil)
	}
	if err != nil {
		// A peer that closed at once: what it said first tells more.
		if merr := readMagic(conn); merr != nil {
			return fail(merr)
		}
		return fail(err)
	}
	if err := readMagic(conn); err != nil {
		return fail(err)
	}
	hello, fds, err := readMsg(conn, len(s.addrs))
	if err != nil {
		return fail(fmt.Errorf("waiting for the listeners: %w", err))
	}
	refuse := func(err error) (*Takeover, error) {
		fdpass.CloseAll(fds)
		_ = writeMsg(conn, &takeoverMsg{Error: err.Error()}, nil)
		return fail(err)
	}
	switch {
	case hello.Error != "":
		return refuse(fmt.Errorf("the running pgmfa refused: %s", hello.Error))
	case !slices.Equal(hello.Listen, s.addrs) || len(fds) != len(s.addrs):
		return refuse(fmt.Errorf("received %d listeners for %v, wanted %v", len(fds), hello.Listen, s.addrs))
	}
	var lns []net.Listener
	for i, fd := range fds {
		ln, err := net.FileListener(os.NewFile(uintptr(fd), s.addrs[i]))
		unix.Close(fd) // FileListener holds its own duplicate
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			fdpass.CloseAll(fds[i+1:])
			_ = writeMsg(conn, &takeoverMsg{Error: err.Error()}, nil)
			return fail(fmt.Errorf("listener %s: %w", s.addrs[i], err))
		}
		if ul, ok := ln.(*net.UnixListener); ok {
			ul.SetUnlinkOnClose(true) // this process owns the path from now on
		}
		lns = append(lns, ln)
	}
	if err := writeMsg(conn, &takeoverMsg{OK: true}, nil); err != nil {
		for _, l := range lns {
			l.Close()
		}
		return fail(err)
	}
	_ = conn.SetDeadline(time.Time{})
	s.inherited = lns
	s.nextID.Store(hello.NextID)
	s.log.Info("takeover: received the listeners", "from_pid", hello.PID, "listen", s.addrs)
	return &Takeover{conn: conn, pid: hello.PID}, nil
}

// Adopt takes the old process's spliced sessions, once Run serves: it
// returns when every Splicer was adopted (nil), or when the takeover
// failed: then the old process keeps what it did not hand over, and
// serves on if it handed over nothing (Committed says whether it did).
func (t *Takeover) Adopt(s *Server) (committed bool, err error) {
	defer t.conn.Close()
	<-s.booted
	if s.bootErr != nil {
		return false, s.bootErr
	}
	total := 0
	for {
		// The old process first lets its logins in flight finish (up to
		// its drain timeout): no deadline on this wait.
		m, fds, err := readMsg(t.conn, 0)
		fdpass.CloseAll(fds)
		if err != nil {
			return committed, fmt.Errorf("the old process (pid %d) stopped before the sessions were handed over: %w", t.pid, err)
		}
		switch {
		case m.Done:
			s.log.Info("takeover complete: the old process hands over nothing more and drains the rest", "from_pid", t.pid, "sessions_adopted", total)
			return true, nil
		case !m.Splicer:
			return committed, fmt.Errorf("the old process ended the takeover: %s", m.Error)
		}
		n, err := s.adoptSplicer(t.conn)
		if err != nil {
			return committed, err
		}
		committed = true
		total += n
		if err := writeMsg(t.conn, &takeoverMsg{OK: true}, nil); err != nil {
			return true, err
		}
	}
}

// adopted is one Splicer adopted from the old process, closed once its
// last session ends.
type adopted struct {
	sp    atomic.Pointer[bpf.Splicer]
	left  atomic.Int64 // sessions not ended, +1 until Adopt has returned
	close sync.Once
}

// adoptSplicer adopts one Splicer's hand-over and registers its sessions.
func (s *Server) adoptSplicer(conn *net.UnixConn) (int, error) {
	ad := &adopted{}
	ad.left.Store(1)
	var lss []*liveSession
	sp, err := bpf.Adopt(conn, bpf.Options{FlowThreshold: s.cfg.FlowThreshold, MaxBacklog: s.cfg.MaxBacklog, Logger: s.log},
		func(meta []byte, live bpf.Live) func(bpf.Stats) {
			ls, done := s.adoptSession(meta, live, ad)
			lss = append(lss, ls)
			return done
		})
	if err != nil {
		return 0, fmt.Errorf("adopting the spliced sessions: %w", err)
	}
	ad.sp.Store(sp)
	s.adoptMu.Lock()
	s.adopted = append(s.adopted, sp)
	s.adoptMu.Unlock()
	s.sessions.mu.Lock()
	for _, ls := range lss {
		ls.splicer = sp
	}
	s.sessions.mu.Unlock()
	ids := make([]uint64, len(lss))
	for i, ls := range lss {
		ids[i] = ls.info.ID
	}
	s.log.Info("takeover: spliced sessions adopted", "sessions", len(lss), "conns", ids)
	s.adoptedEnded(ad)
	return len(lss), nil
}

// adoptedEnded counts an adopted session's end (or Adopt's return) and
// closes the Splicer after the last.
func (s *Server) adoptedEnded(ad *adopted) {
	if ad.left.Add(-1) > 0 {
		return
	}
	ad.close.Do(func() {
		sp := ad.sp.Load()
		s.adoptMu.Lock()
		s.adopted = slices.DeleteFunc(s.adopted, func(x *bpf.Splicer) bool { return x == sp })
		s.adoptMu.Unlock()
		// Not on the watcher's goroutine, which Close waits for.
		go sp.Close()
	})
}

// adoptSession registers an adopted session as a spliced session of this
// process and returns its onDone.
func (s *Server) adoptSession(meta []byte, live bpf.Live, ad *adopted) (*liveSession, func(bpf.Stats)) {
	m, err := decodeMeta(meta)
	if err != nil || m.ID == 0 {
		m = sessionMeta{ID: s.nextID.Add(1), User: "?", Database: "?", Client: "?", Since: time.Now().UnixNano()}
		s.log.Warn("an adopted session came without its description; it gets a new id", "conn", m.ID)
	}
	var key *pgproto3.BackendKeyData
	if m.KeySecret != nil {
		key = &pgproto3.BackendKeyData{ProcessID: m.KeyPID, SecretKey: m.KeySecret}
	}
	ad.left.Add(1)
	s.conns.Add(1)
	s.stats.Active.Add(1)
	rec := login.NewRecord(s.log, m.ID, m.Client, nil)
	rec.Observe(s.cfg.Observer)
	rec.Started(login.ModeSockmap)
	uncancel := s.cancels.add(key, m.ID)
	ls := &liveSession{info: SessionInfo{ID: m.ID, User: m.User, Database: m.Database, Client: m.Client,
		Mode: login.ModeSockmap, Since: time.Unix(0, m.Since)}, key: key, carrier: spliced{live}}
	ls.handedOver = func() {
		uncancel()
		rec.HandedOver()
		s.release()
		s.adoptedEnded(ad)
	}
	s.sessions.add(ls)
	return ls, func(st bpf.Stats) {
		s.sessions.remove(m.ID)
		uncancel()
		rec.EndOf(m.User, m.Database, login.Stats{Mode: login.ModeSockmap, ClientToServer: st.ClientToServer,
			ServerToClient: st.ServerToClient, Duration: st.Duration, Reason: st.Reason, FlowControl: st.FlowControl, Relayed: st.Relayed})
		s.release()
		s.adoptedEnded(ad)
	}
}
