package loop

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/pgmfa/pgmfa/proto"
)

// Graceful drain (SIGTERM): stop accepting, let what is in flight finish,
// cut what is left when the time is up.

// DrainResult is what Drain found and did.
type DrainResult struct {
	// Logins and Sessions were in flight when the drain began.
	Logins, Sessions int
	// Ended lists the sessions that ended by themselves during the drain
	// (those that were open at its start and those that logins in flight
	// became); Cut the ones ended at the timeout.
	Ended []uint64
	Cut   []SessionInfo
	// RefusedLogins counts the logins refused with 57P01 at the timeout.
	RefusedLogins int
	// Interrupted: Stop was called during the drain (SIGINT).
	Interrupted bool
}

// ReasonDrainTimeout is the session-end reason of a session cut by Drain.
const ReasonDrainTimeout = "drain timeout"

// drainPoll is how often Drain looks whether everything has ended.
const drainPoll = 50 * time.Millisecond

// cutGrace bounds the wait for cut sessions and refused logins to be gone.
const cutGrace = 5 * time.Second

var errDrainTimeout = errors.New("proxy shutting down: the drain timeout passed before the login completed")

// drainRefusal is what a login still in flight at the drain timeout gets.
var drainRefusal = proto.Append(nil, proto.Fatal(proto.CodeAdminShutdown, "terminating connection due to administrator command",
	"pgmfa is shutting down and its --drain-timeout passed before this login completed; connect again"))

// Drain stops the server gracefully: it closes the listeners (new
// connections are refused by the kernel), lets the logins in flight finish
// and the handed-off sessions run until they end by themselves, for up to
// timeout; then it refuses the logins still in flight (57P01 with a HINT),
// cuts the sessions still open, and stops as Stop does. Stop may be called
// during a drain to cut it short. Everything is logged.
func (s *Server) Drain(timeout time.Duration) DrainResult {
	var res DrainResult
	<-s.booted
	if s.bootErr != nil || s.stopped.Load() {
		return res
	}
	s.tkMu.Lock()
	ok := s.draining.CompareAndSwap(false, true)
	if !ok && s.takingOver {
		// A takeover drains this server when it succeeds; should it
		// fail, this drain runs then (takeover.go).
		s.drainAsked = timeout
		s.log.Info("a takeover is under way: this server drains once it ends")
	}
	s.tkMu.Unlock()
	if !ok {
		return res
	}
	return s.drain(timeout)
}

// drain is Drain once draining is set (by Drain, or by a takeover).
func (s *Server) drain(timeout time.Duration) DrainResult {
	var res DrainResult
	s.acc.close()
	s.spares.Close() // logins still in flight dial their own
	infos := s.Sessions()
	res.Sessions = len(infos)
	res.Logins = s.loginsInFlight()
	seen := map[uint64]bool{}
	for _, in := range infos {
		seen[in.ID] = true
	}
	s.log.Info("draining: no longer accepting connections; waiting for logins in flight and sessions to end",
		"logins", res.Logins, "sessions", res.Sessions, "session_conns", ids(infos), "drain_timeout", timeout)

	deadline := time.Now().Add(timeout)
	for s.conns.Load() > 0 && time.Now().Before(deadline) && !s.stopped.Load() {
		time.Sleep(drainPoll)
		now, _ := s.sessions.list()
		for _, in := range now {
			seen[in.ID] = true
		}
	}
	if s.stopped.Load() {
		res.Interrupted = true
		s.log.Info("drain interrupted: stopping now")
		return res
	}
	if s.conns.Load() > 0 {
		res.RefusedLogins = s.refuseLogins()
		res.Cut = s.Sessions()
		var wg sync.WaitGroup
		for _, in := range res.Cut {
			s.log.Info("drain timeout: session cut", "conn", in.ID, "user", in.User, "database", in.Database, "mode", in.Mode,
				"client_to_server", in.ClientToServer, "server_to_client", in.ServerToClient, "age", time.Since(in.Since).Round(time.Millisecond))
			if _, c, key, ok := s.sessions.get(in.ID); ok {
				// Its backend is ended too (endSession): a query left
				// running would outlive the proxy for nothing.
				wg.Go(func() {
					if err := s.endSession(in.ID, c, key, ReasonDrainTimeout, cutGrace); err != nil {
						s.log.Warn("drain timeout: session did not end", "conn", in.ID, "err", err)
					}
				})
			}
		}
		wg.Wait()
		end := time.Now().Add(cutGrace)
		for s.conns.Load() > 0 && time.Now().Before(end) && !s.stopped.Load() {
			time.Sleep(5 * time.Millisecond)
		}
	}
	for id := range seen {
		if !slices.ContainsFunc(res.Cut, func(in SessionInfo) bool { return in.ID == id }) {
			res.Ended = append(res.Ended, id)
		}
	}
	slices.Sort(res.Ended)
	s.log.Info("drain finished", "sessions_ended", len(res.Ended), "ended_conns", res.Ended,
		"sessions_cut", len(res.Cut), "cut_conns", ids(res.Cut), "logins_refused", res.RefusedLogins)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = s.Stop(ctx)
	return res
}

// loginsInFlight counts the client connections that are not handed-off
// sessions: logins, on the event loops or in the TLS driver.
func (s *Server) loginsInFlight() int {
	return max(int(s.conns.Load())-s.sessions.len(), 0)
}

// refuseLogins ends every login in flight with drainRefusal and returns how
// many there were.
func (s *Server) refuseLogins() int {
	n := s.loginsInFlight()
	if s.tls != nil {
		s.tls.RefuseLogins(drainRefusal)
	}
	s.logins.Range(func(_, v any) bool {
		c := v.(*conn)
		c.exec(func() {
			if c.closed || c.handedOff {
				return
			}
			c.writeClient(drainRefusal)
			c.close(errDrainTimeout)
		})
		return true
	})
	return n
}

func ids(infos []SessionInfo) []uint64 {
	out := make([]uint64, len(infos))
	for i, in := range infos {
		out[i] = in.ID
	}
	return out
}
