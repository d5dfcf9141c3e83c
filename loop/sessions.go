package loop

import (
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/proto"
)

// Live sessions: the registry behind `pgmfa sessions`. A session is
// entered once at its handoff and removed once at its end, under one
// mutex; nothing on the data path touches it. Its byte counts are read
// only when someone asks, from the counters each carrier keeps anyway:
// the kernel's (bpf.Live), the relay's, the TLS driver's.

// SessionInfo describes one live handed-off session.
type SessionInfo struct {
	ID       uint64 // the connection id (conn= in the log)
	User     string
	Database string
	Client   string // the client's address
	// Mode is login.ModeSockmap, login.ModeRelay or login.ModeTLSRelay.
	Mode string
	// ClientToServer and ServerToClient count the bytes moved so far.
	ClientToServer, ServerToClient uint64
	Since                          time.Time // the handoff
}

// ErrNoSession is returned by EndSession for an id that names no live
// session.
var ErrNoSession = errors.New("no live session has this id")

// carrier is what carries a session: the splicer, the relay or the TLS
// driver, through its handle.
type carrier interface {
	Counts() (clientToServer, serverToClient uint64)
	End(reason string)
}

// liveSession is a registry entry. carrier is nil until the handoff has
// chosen one (the entry is made before, so that an end that comes first
// finds it).
type liveSession struct {
	info    SessionInfo
	key     *pgproto3.BackendKeyData
	carrier carrier
	// A spliced session: its Splicer, and what to do when that Splicer
	// hands it over to another process (takeover.go), which then owns it.
	splicer    *bpf.Splicer
	handedOver func()
}

type sessionRegistry struct {
	mu sync.Mutex
	m  map[uint64]*liveSession
}

func (r *sessionRegistry) add(ls *liveSession) {
	r.mu.Lock()
	if r.m == nil {
		r.m = make(map[uint64]*liveSession)
	}
	r.m[ls.info.ID] = ls
	r.mu.Unlock()
}

// attach records the carrier of a session, unless it has ended already.
func (r *sessionRegistry) attach(id uint64, mode string, c carrier) {
	r.mu.Lock()
	if ls := r.m[id]; ls != nil {
		ls.info.Mode, ls.carrier = mode, c
	}
	r.mu.Unlock()
}

// attachSpliced is attach for a spliced session (see liveSession).
func (r *sessionRegistry) attachSpliced(id uint64, sp *bpf.Splicer, live bpf.Live, handedOver func()) {
	r.mu.Lock()
	if ls := r.m[id]; ls != nil {
		ls.info.Mode, ls.carrier, ls.splicer, ls.handedOver = login.ModeSockmap, spliced{live}, sp, handedOver
	}
	r.mu.Unlock()
}

// handedOver removes the sessions sp carried, which sp has handed over to
// another process, and returns them.
func (r *sessionRegistry) handedOver(sp *bpf.Splicer) []*liveSession {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*liveSession
	for id, ls := range r.m {
		if ls.splicer == sp {
			delete(r.m, id)
			out = append(out, ls)
		}
	}
	return out
}

func (r *sessionRegistry) remove(id uint64) {
	r.mu.Lock()
	delete(r.m, id)
	r.mu.Unlock()
}

func (r *sessionRegistry) get(id uint64) (SessionInfo, carrier, *pgproto3.BackendKeyData, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ls := r.m[id]
	if ls == nil || ls.carrier == nil {
		return SessionInfo{}, nil, nil, false
	}
	return ls.info, ls.carrier, ls.key, true
}

// list returns the sessions with a carrier, without their counts.
func (r *sessionRegistry) list() ([]SessionInfo, []carrier) {
	r.mu.Lock()
	defer r.mu.Unlock()
	infos := make([]SessionInfo, 0, len(r.m))
	cs := make([]carrier, 0, len(r.m))
	for _, ls := range r.m {
		if ls.carrier != nil {
			infos = append(infos, ls.info)
			cs = append(cs, ls.carrier)
		}
	}
	return infos, cs
}

func (r *sessionRegistry) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.m)
}

// spliced adapts a bpf.Live to carrier.
type spliced struct{ bpf.Live }

func (s spliced) Counts() (uint64, uint64) {
	c2s, s2c, _ := s.Live.Counts() // zero once ended: the entry is about to go
	return c2s, s2c
}

func (s spliced) End(reason string) { s.Live.End(reason) }

// Sessions lists the live handed-off sessions, oldest first, with their
// byte counts as of now.
func (s *Server) Sessions() []SessionInfo {
	infos, cs := s.sessions.list()
	for i, c := range cs {
		infos[i].ClientToServer, infos[i].ServerToClient = c.Counts()
	}
	slices.SortFunc(infos, func(a, b SessionInfo) int {
		if c := a.Since.Compare(b.Since); c != 0 {
			return c
		}
		return int(a.ID - b.ID)
	})
	return infos
}

// ReasonKilled is the session-end reason of a session ended by EndSession.
const ReasonKilled = "ended by pgmfa sessions --kill"

// EndSession ends the live session id: both of its sockets are closed,
// which ends its database session too (PostgreSQL ends a backend whose
// client is gone the next time it reads or writes the socket), and a
// CancelRequest with the backend's own key interrupts a query it is
// running, so that it gets there now rather than when the query ends. It
// waits (up to wait) for the session to be gone and returns what it was.
// An id that names no live session is ErrNoSession, and changes nothing.
func (s *Server) EndSession(id uint64, wait time.Duration) (SessionInfo, error) {
	info, c, key, ok := s.sessions.get(id)
	if !ok {
		return SessionInfo{}, ErrNoSession
	}
	info.ClientToServer, info.ServerToClient = c.Counts()
	s.log.Info("ending a session on request", "conn", id, "user", info.User, "database", info.Database, "mode", info.Mode)
	return info, s.endSession(id, c, key, ReasonKilled, wait)
}

// endSession ends a session through its carrier, waits for it to be gone,
// then interrupts its backend (see EndSession).
func (s *Server) endSession(id uint64, c carrier, key *pgproto3.BackendKeyData, reason string, wait time.Duration) error {
	c.End(reason)
	deadline := time.Now().Add(wait)
	for {
		if _, _, _, live := s.sessions.get(id); !live {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("session %d was asked to end but is still listed after %v", id, wait)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if key != nil {
		// The socket is closed first: an idle backend then exits on its
		// own, and a busy one, interrupted, finds its client gone.
		if err := s.cancelBackend(key, wait); err != nil {
			s.log.Warn("could not send the ended session's backend a cancel request", "conn", id, "err", err)
		}
	}
	return nil
}

// cancelBackend sends the database a CancelRequest with key, as a client
// would, and waits for the database to close the connection (it does once
// it has signalled the backend). The socket is already closed by then, so
// the interrupted backend finds its client gone and exits.
func (s *Server) cancelBackend(key *pgproto3.BackendKeyData, wait time.Duration) error {
	d := net.Dialer{Timeout: wait}
	nc, err := d.Dial(s.upAddr.Network(), s.upAddr.String())
	if err != nil {
		return err
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(wait))
	if _, err := nc.Write(proto.Append(nil, &pgproto3.CancelRequest{ProcessID: key.ProcessID, SecretKey: key.SecretKey})); err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, nc)
	return err
}

// tlsEstablished is the TLS driver's Established hook.
func (s *Server) tlsEstablished(id uint64, user, database, addr string, key *pgproto3.BackendKeyData, h *tlsproxy.Session) func() {
	s.sessions.add(&liveSession{
		info: SessionInfo{ID: id, User: user, Database: database, Client: addr, Mode: login.ModeTLSRelay, Since: time.Now()},
		key:  key, carrier: h,
	})
	return func() { s.sessions.remove(id) }
}
