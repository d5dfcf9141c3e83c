package tlsproxy

import (
	"context"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/proto"
)

// forwardCancel forwards the client's CancelRequest to the database, byte
// for byte, when the RouteCancel hook allows it, and waits (bounded) until
// the database has closed that connection: PostgreSQL closes a cancel
// connection only once it has signalled the backend, and libpq waits for
// that close so that the cancel cannot hit the client's next query. The
// client's connection is closed after this returns (the machine's Close),
// so the client sees the same ordering as directly. It runs on the login
// goroutine, which has nothing else to do for a cancel connection.
func (s *sess) forwardCancel(req *pgproto3.CancelRequest) {
	if f := s.d.cfg.Hooks.RouteCancel; f != nil && !f(req, s.h.Addr) {
		return
	}
	ctx, cancel := context.WithTimeout(s.d.ctx, login.CancelTimeout)
	defer cancel()
	c, err := s.d.cfg.DialUpstream(ctx)
	if err != nil {
		s.d.log.Warn("cancel request not forwarded", "conn", s.h.ID, "client", s.h.Addr, "err", err)
		return
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := c.Write(proto.Append(nil, req)); err != nil {
		s.d.log.Warn("cancel request not forwarded", "conn", s.h.ID, "client", s.h.Addr, "err", err)
		return
	}
	// The database sends nothing; wait for its close.
	_, _ = io.Copy(io.Discard, io.LimitReader(c, 1<<10))
}
