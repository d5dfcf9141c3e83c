package loop

import (
	"errors"
	"time"

	"github.com/panjf2000/gnet/v2"
	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/loop/relay"
	"github.com/pgmfa/pgmfa/proto/session"
)

// handoff takes an authenticated, released session out of gnet and gives
// its two sockets to the kernel (sockmap) or to the user-space relay.
//
// The sequence (DESIGN.md, "Handoff to the kernel"): both conns are on this
// loop and nothing is left in gnet's outbound buffers; take the read-ahead
// (client bytes pipelined behind the login, anything the database sent
// after ReadyForQuery); dup both fds; close both gnet conns synchronously so
// gnet never polls them again (the sockets stay open through the dups); the
// new owner writes the held bytes first and then moves the rest.
// The release (AuthenticationOk … ReadyForQuery) is not written through
// gnet at all: it travels as the first pending bytes to the client, so
// nothing is left in gnet to wait for.
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
	if c.client != nil {
		toServer = takeAll(c.client)
		fd, err := c.client.Dup()
		if err != nil {
			c.closeOnError(err)
			return
		}
		cfd = fd
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
	c.handedOff = true
	c.stopWaiting()
	if c.client != nil {
		_ = c.loop.Close(c.client)
	}
	_ = c.loop.Close(c.upstream)
	c.client, c.upstream = nil, nil

	c.uncancel = c.srv.cancels.add(est.Key, c.id)
	c.audit(true, nil)
	c.start = time.Now()

	if sp := c.srv.splicer; sp != nil {
		err := sp.Splice(cfd, ufd, toServer, toClient, func(st bpf.Stats) {
			c.ended(sessionEnd{mode: "sockmap", c2s: st.ClientToServer, s2c: st.ServerToClient, dur: st.Duration,
				reason: st.Reason, flowControl: st.FlowControl, relayed: st.Relayed})
		})
		if err == nil {
			c.srv.stats.Spliced.Add(1)
			return
		}
		var partial *bpf.PartialWriteError
		if errors.As(err, &partial) {
			// Some held bytes are out and some are not: no path can
			// continue this byte stream faithfully.
			unix.Close(cfd)
			unix.Close(ufd)
			c.ended(sessionEnd{mode: "sockmap", reason: "handoff failed: " + err.Error()})
			return
		}
		c.srv.log.Info("session not spliced; using the user-space relay", "conn", c.id, "reason", err.Error())
	}
	err = c.srv.relay.Add(cfd, ufd, toServer, toClient, func(st relay.Stats) {
		c.ended(sessionEnd{mode: "relay", c2s: st.ClientToServer, s2c: st.ServerToClient, dur: st.Duration, reason: st.Reason})
	})
	if err != nil {
		unix.Close(cfd)
		unix.Close(ufd)
		c.ended(sessionEnd{mode: "relay", reason: "handoff failed: " + err.Error()})
		return
	}
	c.srv.stats.Relayed.Add(1)
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

// sessionEnd is what the session-end line reports.
type sessionEnd struct {
	mode        string
	c2s, s2c    uint64
	dur         time.Duration
	reason      string
	flowControl uint64 // sockmap: flow-control episodes
	relayed     uint64 // sockmap: bytes flow control moved in user space
}

// ended logs the end of a handed-off session and frees what it held. It
// runs on the splicer's or the relay's goroutine.
func (c *conn) ended(e sessionEnd) {
	c.uncancel()
	c.srv.log.Info("session end", "conn", c.id, "client", c.addr, "user", c.m.User(), "database", c.m.Database(),
		"mode", e.mode, "bytes_client_to_server", e.c2s, "bytes_server_to_client", e.s2c,
		"flow_control", e.flowControl, "relayed_bytes", e.relayed,
		"duration", e.dur.Round(time.Millisecond), "reason", e.reason)
	c.srv.conns.Add(-1)
	c.srv.stats.Active.Add(-1)
}
