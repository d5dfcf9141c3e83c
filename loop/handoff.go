package loop

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/panjf2000/gnet/v2"
	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/loop/relay"
	"github.com/pgmfa/pgmfa/proto/session"
)

// handoff takes an authenticated, released session out of gnet and gives
// its two sockets to the kernel (sockmap) or to the user-space relay.
//
// The sequence: both conns are on this loop and nothing is left in gnet's
// outbound buffers; the release (AuthenticationOk … ReadyForQuery) is
// written straight to the client's socket, not through gnet, so the client
// can go on while the rest happens (what the socket does not take at once
// stays pending, first in line); take the read-ahead (client bytes
// pipelined behind the login, anything the database sent after
// ReadyForQuery); dup both fds; close both gnet conns synchronously so
// gnet never polls them again (the sockets stay open through the dups);
// the new owner writes the held bytes first and then moves the rest. The
// session's byte counts start after the release: they are the session's,
// not the login's.
func (c *conn) handoff(release []byte, est *session.Established) {
	if (c.client == nil && c.clientFD == 0) || c.upstream == nil {
		c.close(errors.New("a side closed at the handoff"))
		return
	}
	if (c.client != nil && c.client.OutboundBuffered() > 0) || c.upstream.OutboundBuffered() > 0 {
		// Login traffic still queued in gnet (a peer with a full receive
		// buffer): retry shortly rather than lose or reorder it. The
		// handshake deadline still bounds this.
		c.after(time.Millisecond, func() {
			if !c.closed && !c.handedOff {
				c.handoff(release, est)
			}
		})
		return
	}
	var cfd int
	var toServer []byte
	toClient := append(c.clientOut, release...)
	toClient = append(toClient, takeAll(c.upstream)...)
	// The release goes out before the sockets move, not after: the client
	// waits for its ReadyForQuery, while the dups, the map inserts and the
	// watcher's registration (~20 system calls, 0.3–0.4 ms on this
	// machine's virtualised kernel) need nothing from it. A query the
	// client sends at once waits in its socket's receive queue, which the
	// new owner takes over with the socket (the splicer's SO_RCVLOWAT kick
	// makes the verdict see it; the relay reads it). Whatever the socket
	// does not take now stays in toClient for the new owner, in order.
	toClient = writeNow(c.clientSocket(), toClient)
	c.tl.mark(stepReleaseSent)
	if c.client != nil {
		var ok bool
		if cfd, toServer, ok = c.dupClient(); !ok {
			return
		}
	} else {
		// The client half-closed during the login (see OnClose).
		cfd, toServer = c.clientFD, c.clientHeld
		c.clientFD, c.clientHeld, c.clientOut = 0, nil, nil
	}
	ufd, err := c.upstream.Dup()
	if err != nil {
		unix.Close(cfd)
		c.closeOnError(err)
		return
	}
	c.detach(false)

	uncancel := c.srv.cancels.add(est.Key, c.id)
	c.rec.Audit(c.m, true, nil)
	// From here on the session is a handed: the callbacks below hold it,
	// not the conn, so the login's state (its machine, the held startup
	// and server messages, timers, timeline) is garbage once this callback
	// returns; a session kept for hours keeps only what its end needs.
	h := &handed{srv: c.srv, id: c.id, rec: c.rec, user: c.m.User(), database: c.m.Database(), uncancel: uncancel}
	// Listed before the carrier takes it: its end (ended) may come before
	// Splice or Add returns.
	since := time.Now()
	c.srv.sessions.add(&liveSession{info: SessionInfo{ID: c.id, User: h.user, Database: h.database, Client: c.addr, Since: since},
		key: est.Key})

	if sp := c.srv.splicer; sp != nil {
		c.rec.Started(login.ModeSockmap)
		// What a process taking over needs to carry the session on
		// (takeover.go).
		meta := encodeMeta(c.id, h.user, h.database, c.addr, since, est.Key)
		live, err := sp.SpliceLive(cfd, ufd, toServer, toClient, meta, func(st bpf.Stats) {
			h.ended(login.Stats{Mode: login.ModeSockmap, ClientToServer: st.ClientToServer, ServerToClient: st.ServerToClient,
				Duration: st.Duration, Reason: st.Reason, FlowControl: st.FlowControl, Relayed: st.Relayed})
		})
		if err == nil {
			c.srv.sessions.attachSpliced(c.id, sp, live, h.handedOver)
			c.srv.stats.Spliced.Add(1)
			return
		}
		var partial *bpf.PartialWriteError
		if errors.As(err, &partial) {
			// Some held bytes are out and some are not: no path can
			// continue this byte stream faithfully.
			unix.Close(cfd)
			unix.Close(ufd)
			h.ended(login.Stats{Mode: login.ModeSockmap, Reason: "handoff failed: " + err.Error()})
			return
		}
		level := slog.LevelInfo
		if errors.Is(err, bpf.ErrNotEstablished) {
			// The peer already closed: a client that quit right after
			// its login, routine for scripts and pgbench -C.
			level = slog.LevelDebug
		}
		c.srv.log.Log(context.Background(), level, "session not spliced; using the user-space relay", "conn", c.id, "reason", err.Error())
		c.rec.Fallback(err)
	}
	c.rec.Started(login.ModeRelay)
	rs, err := c.srv.relay.Add(cfd, ufd, toServer, toClient, func(st relay.Stats) {
		h.ended(login.Stats{Mode: login.ModeRelay, ClientToServer: st.ClientToServer, ServerToClient: st.ServerToClient,
			Duration: st.Duration, Reason: st.Reason})
	})
	if err != nil {
		unix.Close(cfd)
		unix.Close(ufd)
		h.ended(login.Stats{Mode: login.ModeRelay, Reason: "handoff failed: " + err.Error()})
		return
	}
	c.srv.sessions.attach(c.id, login.ModeRelay, rs)
	c.srv.stats.Relayed.Add(1)
}

// handed is what a handed-off session keeps of its login until it ends:
// enough for its end (the registry entry, the cancel key, the session-end
// line, the connection slot). Its carrier's callbacks hold this and not
// the conn, whose login state would otherwise live as long as the session
// (a few KiB each: the machine with the startup packet and the held
// ParameterStatus messages, the timers, the timeline).
type handed struct {
	srv            *Server
	id             uint64
	rec            *login.Record
	user, database string
	uncancel       func()
}

// ended logs the end of a handed-off session and frees what it held. It
// runs on the splicer's or the relay's goroutine.
func (h *handed) ended(st login.Stats) {
	h.srv.sessions.remove(h.id)
	h.uncancel()
	h.rec.EndOf(h.user, h.database, st)
	h.srv.release()
}

// handedOver lets go of a spliced session that its Splicer handed over to
// another process (takeover.go), which ends it.
func (h *handed) handedOver() {
	h.uncancel()
	h.rec.HandedOver()
	h.srv.release()
}

// clientSocket is the client's descriptor while the login holds it: gnet's
// conn's, or the kept duplicate of a client that half-closed; -1 if none.
func (c *conn) clientSocket() int {
	switch {
	case c.client != nil:
		return c.client.Fd()
	case c.clientFD > 0:
		return c.clientFD
	}
	return -1
}

// writeNow writes what the non-blocking socket fd takes of b now and
// returns the rest (all of b when fd is -1 or the write fails: the
// session's next owner reports the failure).
func writeNow(fd int, b []byte) []byte {
	for fd >= 0 && len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err != nil || n <= 0 {
			break
		}
		b = b[n:]
	}
	return b
}

// dupClient takes what gnet holds of the client's bytes and a duplicate of
// its socket, for the session's next owner. On failure the login is ended.
func (c *conn) dupClient() (fd int, held []byte, ok bool) {
	held = takeAll(c.client)
	fd, err := c.client.Dup()
	if err != nil {
		c.closeOnError(err)
		return 0, nil, false
	}
	return fd, held, true
}

// takeAll removes and copies everything gnet holds for a connection (the
// slices gnet returns alias its loop buffer).
func takeAll(gc gnet.Conn) []byte {
	if gc.InboundBuffered() == 0 {
		return nil
	}
	b, _ := gc.Next(-1)
	return append([]byte(nil), b...)
}

// detach takes the connection out of gnet for good, once its sockets are
// duplicated (or, for a TLS handoff at open, about to be closed by gnet
// itself: atOpen): gnet's conns are closed synchronously so that gnet
// never polls them again, while the sockets stay open through the dups.
// The login's timers and its out-of-band wait end here.
func (c *conn) detach(atOpen bool) {
	c.handedOff = true
	c.srv.logins.Delete(c.id)
	c.stopWaiting()
	switch {
	case c.client == nil:
	case atOpen:
		// OnOpen returns gnet.Close for it; the context tells OnClose that
		// the conn is no longer a login's.
		c.client.SetContext(&tlsSide{})
	default:
		_ = c.loop.Close(c.client)
	}
	if c.upstream != nil {
		_ = c.loop.Close(c.upstream)
	}
	c.client, c.upstream = nil, nil
}
