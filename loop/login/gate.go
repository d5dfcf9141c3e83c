package login

import (
	"log/slog"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

// Gate is the MFA policy of a proxy, shared by every connection of both
// drivers. Safe for concurrent use.
type Gate struct {
	// Required: every login needs a second factor (--mfa required); when
	// false every login passes as exempt.
	Required bool
	// Exempt users skip MFA (--mfa-exempt).
	Exempt map[string]bool
	// Guard verifies codes and remembers recent successes; Approvals holds
	// the logins waiting for `pgmfa approve`. Both are needed when Required.
	Guard     *mfa.Guard
	Approvals *mfa.Approvals
	// Web is the approval page (--web; nil: none). It admits a login its
	// user approved on the page, and hears of every login that needs an
	// approval: it may refuse it at once with a link (Referral.Refused) or
	// let it wait, then tell the user where to approve it.
	Web Web
	// Logger receives the warning about a second login of a user waiting
	// at the same time.
	Logger *slog.Logger
}

// Decided decides an MFA request that needs no store I/O: MFA off, an
// exempt user, or a login inside its --mfa-remember window (in-memory
// checks: Guard.Remembered takes the guard's mutex, which Verify never
// holds across store I/O). The gnet driver calls it on the event loop
// before it sends a code to a goroutine, so a login that sends a code
// anyway (a pool that puts it in every connection string) costs no
// goroutine hop; that hop (a goroutine, a thread wake-up, then the loop's
// eventfd) cost ~0.16-0.18 ms per login on a busy 2-core machine ("mfa" in
// the login timing line; README, "Logins, step by step"). Resolve checks
// the same cases first, then the remember window of a store with I/O.
func (g *Gate) Decided(req *session.MFARequest, addr string) (mfa.Path, mfa.Outcome, bool) {
	switch {
	case !g.Required || g.Exempt[req.User]:
		return mfa.PathExempt, mfa.Outcome{OK: true}, true
	case g.Guard.InMemory() && g.Guard.Remembered(req.User, addr):
		// Only a store without I/O (the file store) answers from memory;
		// a PostgreSQL store's window is read on a goroutine (Resolve).
		return mfa.PathRemembered, mfa.Outcome{OK: true}, true
	case g.Web != nil && g.Web.Admitted(req.User, addr):
		// Approved on the page moments ago, for this address (in memory).
		return mfa.PathWeb, mfa.Outcome{OK: true}, true
	}
	return "", mfa.Outcome{}, false
}

// Resolve decides an MFA request: exempt, remembered (or approved on the
// web page), a code verified now, a refusal carrying the web page's link,
// or a wait for `pgmfa approve` (or the page). When it can decide now it returns the
// decision; otherwise waiting is true and later is called exactly once from
// another goroutine, unless cancel is called first. A request with a code
// is always decided now. Every branch but exemption may do store I/O (a
// file lock and a synced write; with a PostgreSQL store, round trips):
// callers on an event loop run it elsewhere.
//
// connID is the connection's id in the log; it is also the approval id
// (`pgmfa approve --conn ID`) when the login waits.
func (g *Gate) Resolve(req *session.MFARequest, connID uint64, addr string, later func(mfa.Path, mfa.Outcome)) (path mfa.Path, o mfa.Outcome, cancel func(), waiting bool) {
	if path, o, ok := g.Decided(req, addr); ok {
		return path, o, nil, false
	}
	switch {
	case !g.Guard.InMemory() && g.Guard.Remembered(req.User, addr):
		// The remember window of a store with I/O (PostgreSQL), which
		// Decided leaves to this goroutine.
		return mfa.PathRemembered, mfa.Outcome{OK: true}, nil, false
	case req.Code != "":
		path := mfa.PathCode
		if req.Source == session.SourcePassword {
			path = mfa.PathPassword
		}
		o := g.Guard.Verify(req.User, addr, req.Code)
		if o.OK && o.Reason == mfa.ReasonRemembered {
			path = mfa.PathRemembered
		}
		return path, o, nil, false
	}
	if o := g.Guard.CheckEnrolled(req.User); !o.OK {
		// Not enrolled, or the store cannot say (fail closed).
		return mfa.PathCode, o, nil, false
	}
	l := mfa.Login{ConnID: connID, User: req.User, Addr: addr, Database: req.Database, AppName: req.AppName}
	if g.Web != nil {
		if o, refused := g.Web.Refer(l); refused {
			// libpq shows nothing but an error before AuthenticationOk:
			// the link travels in the refusal's HINT.
			return mfa.PathWeb, o, nil, false
		}
	}
	p, others, more, cancel := g.Approvals.Wait(l, func(o mfa.Outcome) { later(mfa.PathApproval, o) })
	if g.Web != nil {
		g.Web.Waiting(p)
	}
	for _, w := range others {
		// Whoever has the password may be racing the real user for the
		// approval: say so, with both addresses.
		g.logger().Warn("another login of the user is already waiting for MFA approval", "user", req.User,
			"conn", p.ID, "client", addr, "waiting_conn", w.ID, "waiting_client", w.Addr,
			"waiting_since", w.Since.Format(time.RFC3339))
	}
	if more > 0 {
		// The oldest few are named (mfa.MaxOthers); a pool opening many
		// connections without a code would otherwise log every waiting
		// login again for each new one (n² lines: 50 million at 10,000
		// waiting logins).
		g.logger().Warn("more logins of the user are already waiting for MFA approval", "user", req.User,
			"conn", p.ID, "client", addr, "more_waiting", more)
	}
	return mfa.PathApproval, mfa.Outcome{}, cancel, true
}

// Web is the approval page as the gate sees it (loop/web.Server). Its
// methods must not block: Admitted runs on event loops.
type Web interface {
	// Admitted reports whether user from addr was approved on the page
	// within its short window (in memory).
	Admitted(user, addr string) bool
	// Refer is asked about a login of an enrolled user without a code
	// before it would wait: refused true ends it now with o (a link in
	// the HINT); false lets it wait.
	Refer(l mfa.Login) (o mfa.Outcome, refused bool)
	// Waiting hears of a login that started waiting for approval.
	Waiting(p mfa.Pending)
}

// Ask is Resolve for a caller that takes every decision the same way:
// decide is called now when Resolve decides now, else later (once, from
// another goroutine) unless cancel is called first. It has the shape of
// the TLS driver's MFA hook.
func (g *Gate) Ask(req *session.MFARequest, connID uint64, addr string, decide func(mfa.Path, mfa.Outcome)) (cancel func(), waiting bool) {
	path, o, cancel, waiting := g.Resolve(req, connID, addr, decide)
	if !waiting {
		decide(path, o)
		return func() {}, false
	}
	return cancel, true
}

func (g *Gate) logger() *slog.Logger {
	if g.Logger == nil {
		return slog.Default()
	}
	return g.Logger
}

// Decision turns an MFA outcome into the login machine's decision.
func Decision(o mfa.Outcome) session.Decision {
	return session.Decision{OK: o.OK, Code: o.Code, Message: o.Message, Hint: o.Hint}
}
