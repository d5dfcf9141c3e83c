package loop

import (
	"context"
	"errors"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/panjf2000/gnet/v2"
	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

// conn is one client connection and, once dialed, its database connection.
// Every method runs on the event loop that owns the client socket.
type conn struct {
	srv      *Server
	id       uint64
	client   gnet.Conn
	upstream gnet.Conn
	loop     gnet.EventLoop
	m        *session.Machine
	rec      *login.Record // the MFA outcome and wait, the audit and session-end lines
	addr     string        // client address for throttling and the log (rec.Addr())
	start    time.Time

	deadline *time.Timer // startup, handshake, then MFA wait

	// A client that half-closed (FIN) once nothing more was needed from it
	// is closed by gnet (it has no half-close); we keep a dup of its socket
	// and its unparsed bytes and finish the login on them.
	clientFD   int
	clientHeld []byte
	clientOut  []byte // bytes for the half-closed client not yet written

	cancelConn gnet.Conn // a CancelRequest being forwarded for this client
	cancelling bool      // this client sent a CancelRequest; it is being forwarded

	inStartup bool // the startup timeout runs, not yet the handshake's

	tl timeline // when each step of the login happened (timing.go)

	closed     bool
	handedOff  bool
	released   bool // the conns slot was given back
	mfaDecided bool // the MFA decision reached the machine
}

// The contexts gnet carries for us, to tell a connection's role.
type (
	clientSide   struct{ c *conn }
	upstreamSide struct {
		c     *conn
		spare bool // the connection was a spare (loop/spare), opened before the login
	}
)

// cancelSide is the connection forwarding a client's CancelRequest.
type cancelSide struct {
	c      *conn
	packet []byte
}

// maxPendingOutput bounds the bytes a login may hold for a peer that does
// not read them (gnet queues without limit what the socket does not take).
// A login writes a few hundred bytes to the client; more than this unsent
// means the client is not reading, and the login is ended. The database
// side is allowed one largest message more (it gets the client's
// authentication responses).
const maxPendingOutput = 64 << 10

// OnOpen handles a new client, a dialed upstream, or a cancel forward.
func (s *Server) OnOpen(gc gnet.Conn) ([]byte, gnet.Action) {
	switch ctx := gc.Context().(type) {
	case *upstreamSide:
		c := ctx.c
		if c.closed {
			return nil, gnet.Close
		}
		c.upstream = gc
		c.tl.mark(stepDialed)
		c.tl.spare = ctx.spare
		// gnet applies its socket-buffer options to accepted sockets
		// only; the database socket is dialed, so --socket-buffer is set
		// here (before any byte moves, so autotuning is off from the start).
		if b := s.cfg.SocketBuf; b > 0 {
			if err := gc.SetReadBuffer(b); err != nil {
				s.log.Warn("could not set the database socket's receive buffer", "conn", c.id, "bytes", b, "err", err)
			}
			if err := gc.SetWriteBuffer(b); err != nil {
				s.log.Warn("could not set the database socket's send buffer", "conn", c.id, "bytes", b, "err", err)
			}
		}
		c.act(c.m.UpstreamConnected())
		return nil, gnet.None
	case *cancelSide:
		// The database reads the cancel packet, signals the backend and
		// closes; the client's connection is closed when it has (OnClose).
		if ctx.c.closed {
			return nil, gnet.Close
		}
		ctx.c.cancelConn = gc
		return ctx.packet, gnet.None
	}

	// A client accepted by the acceptor (accept.go), which counted it
	// against --max-conns.
	pc, ok := gc.Context().(*pendingClient)
	if !ok || !pc.open() {
		return nil, gnet.Close
	}
	s.stats.Active.Add(1)
	id := s.nextID.Add(1)
	rec := login.NewRecord(s.log, id, gc.RemoteAddr().String(), s.countLogin)
	rec.Observe(s.cfg.Observer)
	c := &conn{
		srv:    s,
		id:     id,
		client: gc,
		loop:   gc.EventLoop(),
		rec:    rec,
		addr:   rec.Addr(),
		start:  rec.Start(),
		m:      session.New(s.sessionConfig()),
	}
	c.tl.at[stepAccepted] = pc.accepted
	c.tl.mark(stepOpened)
	gc.SetContext(&clientSide{c})
	s.logins.Store(id, c)
	if s.upstreamTLS {
		// The database side needs TLS: the whole connection runs in the
		// TLS driver from its first byte.
		c.handoffTLS(nil, false, false, true)
		return nil, gnet.Close
	}
	// Until the StartupMessage, the shorter startup timeout: a connection
	// that says nothing costs its descriptors only that long.
	c.inStartup = true
	c.deadline = c.after(s.cfg.StartupTimeout, func() {
		if c.inStartup { // not a tick that lost the race with the StartupMessage
			c.act(c.m.Timeout(false))
		}
	})
	return nil, gnet.None
}

// OnTraffic feeds whatever arrived to the login machine, one message at a
// time, until it needs more bytes or the connection changes hands.
func (s *Server) OnTraffic(gc gnet.Conn) gnet.Action {
	switch ctx := gc.Context().(type) {
	case *clientSide:
		if ctx.c.cancelling {
			// PostgreSQL reads nothing after a CancelRequest either.
			_, _ = gc.Discard(-1)
			break
		}
		ctx.c.drain(gc, ctx.c.m.FromClient)
	case *upstreamSide:
		ctx.c.drain(gc, ctx.c.m.FromUpstream)
	default:
		// Cancel forwards send nothing we read.
		_, _ = gc.Discard(-1)
	}
	return gnet.None
}

// drain feeds what gc holds to the machine. Peek(-1) is everything gnet
// has buffered, so the machine sees all the unparsed bytes of that side
// (it bounds them: session.Config.MaxPipelined, MaxFromUpstream).
func (c *conn) drain(gc gnet.Conn, step func([]byte) (int, session.Output)) {
	fromUpstream := gc == c.upstream
	t0 := time.Now()
	defer func() { c.tl.inLoop += time.Since(t0) }()
	if fromUpstream {
		c.tl.mark(stepDBFirst)
	}
	for !c.closed && !c.handedOff {
		buf, _ := gc.Peek(-1)
		n, out := step(buf)
		if n > 0 {
			_, _ = gc.Discard(n)
		}
		c.act(out)
		if n == 0 {
			break
		}
	}
	if c.inStartup && !c.closed && !c.handedOff && c.m.Phase() != session.PhaseStartup {
		// The StartupMessage is in: the rest of the handshake timeout.
		c.inStartup = false
		c.deadline.Stop()
		c.deadline = c.after(max(c.srv.cfg.HandshakeTimeout-time.Since(c.start), 0), func() { c.act(c.m.Timeout(false)) })
	}
	// A half-closed client cannot answer a further authentication request.
	if !c.closed && !c.handedOff && c.clientFD > 0 && c.m.NeedsClient() {
		c.act(c.m.ClientClosed())
	}
}

// cutUpstream ends the login because of the database: the machine's words
// to the client, or (when it holds a refusal until the MFA decision and so
// has none yet) a plain close.
func (c *conn) cutUpstream(err error) {
	if out := c.m.UpstreamClosed(err); out.Close {
		c.act(out)
		return
	}
	c.close(err)
}

// OnClose tears the login down when either side goes away before the
// handoff. After the handoff the sockets belong to the kernel or the relay
// and gnet closing its own descriptors means nothing.
func (s *Server) OnClose(gc gnet.Conn, err error) gnet.Action {
	switch ctx := gc.Context().(type) {
	case *clientSide:
		c := ctx.c
		if c.handedOff || c.closed {
			return gnet.None
		}
		if c.cancelling {
			// The forward goes on; its end closes what is left.
			c.client = nil
			return gnet.None
		}
		if isEOF(err) && !c.m.NeedsClient() {
			if fd, derr := gc.Dup(); derr == nil {
				c.clientFD = fd
				c.clientHeld = takeAll(gc)
				c.client = nil
				return gnet.None
			}
		}
		c.client = nil
		c.act(c.m.ClientClosed())
		c.finish()
	case *upstreamSide:
		c := ctx.c
		if !c.handedOff {
			c.upstream = nil
			c.act(c.m.UpstreamClosed(err))
		}
	case *cancelSide:
		// The database processed the cancel (or the forward failed):
		// now close the client, as PostgreSQL closes it after processing.
		ctx.c.cancelConn = nil
		ctx.c.close(nil)
	}
	return gnet.None
}

// act performs one Output of the login machine.
func (c *conn) act(out session.Output) {
	if len(out.ToUpstream) > 0 && c.upstream != nil {
		_, _ = c.upstream.Write(out.ToUpstream)
	}
	if out.Established != nil {
		c.handoff(out.ToClient, out.Established)
		if c.handedOff {
			c.tl.mark(stepReleased)
			c.logTiming()
			c.srv.spares.Refill() // for the next login (loop/spare)
		}
		return
	}
	if out.StartTLS {
		c.handoffTLS(out.ToClient, true, out.DirectTLS, false)
		return
	}
	if len(out.ToClient) > 0 {
		c.writeClient(out.ToClient)
	}
	if out.Dial {
		c.tl.mark(stepStartup)
		c.dial()
	}
	if out.Cancel != nil && c.forwardCancel(out.Cancel) {
		// The client's connection stays open until the database has
		// closed the forwarded one (see forwardCancel).
		return
	}
	if out.NeedMFA != nil {
		c.tl.mark(stepMFAAsked)
		c.askMFA(out.NeedMFA)
	}
	if out.Close {
		c.close(out.Err)
		return
	}
	c.checkBacklog()
}

// closeOnError ends a login that failed on the proxy's side. When the
// proxy ran out of descriptors the client is told to try again (53300),
// as when --max-conns is reached.
func (c *conn) closeOnError(err error) {
	if c.client != nil && (errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE)) {
		_, _ = c.client.Write(proto.Append(nil, proto.Fatal(proto.CodeTooManyConnections, "sorry, too many clients already",
			"pgmfa has no file descriptor left; try again later (if this persists, raise its open-file limit or lower --max-conns)")))
	}
	c.close(err)
}

// checkBacklog ends a login whose peer does not read what it is sent:
// gnet would queue it without limit.
func (c *conn) checkBacklog() {
	if c.closed || c.handedOff {
		return
	}
	switch {
	case c.client != nil && c.client.OutboundBuffered() > maxPendingOutput, len(c.clientOut) > maxPendingOutput:
		c.close(errClientNotReading)
	case c.upstream != nil && c.upstream.OutboundBuffered() > maxPendingOutput+max(c.srv.cfg.MaxMessageLen, proto.DefaultMaxMessageLen):
		c.cutUpstream(errDatabaseNotReading)
	}
}

// writeClient writes to the client through gnet or, once the client
// half-closed, straight to the kept socket (what does not fit now is sent
// ahead of everything else at the handoff).
func (c *conn) writeClient(b []byte) {
	switch {
	case c.client != nil:
		_, _ = c.client.Write(b)
	case c.clientFD > 0:
		c.clientOut = writeNow(c.clientFD, append(c.clientOut, b...)) // handoff.go
	}
}

func isEOF(err error) bool { return errors.Is(err, io.EOF) }

// dial opens the database connection on this connection's own loop.
func (c *conn) dial() {
	c.register(&upstreamSide{c: c}, func(err error) { // dial.go
		if !c.closed {
			c.act(c.m.UpstreamFailed(c.srv.upName, err))
		}
	})
}

// askMFA answers the machine's MFA request through the server's gate,
// bringing the answer back onto this connection's loop. Every answer may
// need the store (a code's claim, a remember grant, the enrollment; with a
// PostgreSQL store each is a round trip), so it is resolved on a goroutine,
// never on the loop: a slow store delays only the logins that wait on it.
func (c *conn) askMFA(req *session.MFARequest) {
	// Decisions that need no store I/O (MFA off, an exempt user, a
	// remember window held in this process's memory) are made here, on the
	// loop, with no goroutine hop (Gate.Decided).
	if path, o, ok := c.srv.gate.Decided(req, c.addr); ok {
		c.decide(path, o)
		return
	}
	go func() {
		path, o, cancel, waiting := c.srv.gate.Resolve(req, c.id, c.addr, func(path mfa.Path, o mfa.Outcome) {
			c.exec(func() { c.decide(path, o) })
		})
		c.exec(func() {
			if !waiting {
				c.decide(path, o)
				return
			}
			if c.closed || c.mfaDecided {
				// Gone, or already released by an approval that came
				// before this event: withdraw the wait.
				cancel()
				return
			}
			c.rec.Wait(req, cancel)
			c.deadline.Stop()
			c.deadline = c.after(c.srv.cfg.MFATimeout, func() {
				c.rec.TimedOut()
				c.act(c.m.Timeout(true))
			})
		})
	}()
}

func (c *conn) decide(path mfa.Path, o mfa.Outcome) {
	if c.closed {
		return
	}
	c.mfaDecided = true
	c.tl.mark(stepMFADecided)
	c.act(c.rec.Decide(c.m, path, o))
}

// close ends a login that did not make it to the handoff.
func (c *conn) close(err error) {
	if c.closed {
		return
	}
	c.closed = true
	c.srv.logins.Delete(c.id)
	c.stopWaiting()
	c.rec.Audit(c.m, false, err)
	if c.client != nil {
		_ = c.client.Close()
	}
	if c.clientFD > 0 {
		unix.Close(c.clientFD)
		c.clientFD = 0
	}
	if c.upstream != nil {
		_ = c.upstream.Close()
	}
	if c.cancelConn != nil {
		_ = c.cancelConn.Close()
		c.cancelConn = nil
	}
	c.finish()
}

func (c *conn) stopWaiting() {
	if c.deadline != nil {
		c.deadline.Stop()
	}
	c.rec.StopWaiting()
}

// finish gives the connection slot back, once.
func (c *conn) finish() {
	if c.released {
		return
	}
	c.released = true
	c.srv.logins.Delete(c.id)
	c.srv.release()
}

// after runs f on this connection's loop after d.
func (c *conn) after(d time.Duration, f func()) *time.Timer {
	return time.AfterFunc(d, func() { c.exec(f) })
}

// exec runs f on this connection's loop.
func (c *conn) exec(f func()) {
	_ = c.loop.Execute(context.Background(), gnet.RunnableFunc(func(context.Context) error {
		f()
		return nil
	}))
}

// forwardCancel forwards a client's CancelRequest to the database, byte
// for byte, when routeCancel allows it (cancel.go), on a connection of this
// loop. It reports whether a forward is under way: the client's connection
// is then closed only once the database has closed the forwarded one, as
// PostgreSQL closes a cancel connection only after it has signalled the
// backend (libpq waits for that close so that a cancel cannot hit the
// client's next query). login.CancelTimeout bounds the wait.
func (c *conn) forwardCancel(req *pgproto3.CancelRequest) bool {
	if !c.srv.routeCancel(req, c.addr) {
		return false
	}
	pkt := proto.Append(nil, req)
	c.register(&cancelSide{c: c, packet: pkt}, func(err error) { // dial.go
		c.srv.log.Warn("cancel request not forwarded", "conn", c.id, "client", c.addr, "err", err)
		c.close(nil)
	})
	c.cancelling = true
	c.stopWaiting()
	c.deadline = c.after(login.CancelTimeout, func() { c.close(nil) })
	return true
}

var (
	errClientNotReading   = errors.New("the client does not read what it is sent (more than 64 KiB unsent)")
	errDatabaseNotReading = errors.New("the database does not read what it is sent")
)
