package mfa

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
)

// ApproverAddr is the approver an Approval without one is charged to.
const ApproverAddr = "admin"

// Approvals releases logins that arrived without a code when an operator (or
// the user) runs `pgmfa approve USER CODE`. An approval releases one login:
// the only one of the user that waits, or the one it names; releasing every
// waiting login of the user takes an explicit All. Safe for concurrent use.
type Approvals struct {
	g     *Guard
	fleet Fleet // nil: this process's waiting logins only

	mu      sync.Mutex
	next    uint64
	waiting map[uint64]*waiter
}

// Login is a login about to wait for approval: what an approver needs to
// tell it from another one.
type Login struct {
	// ConnID is the proxy's connection id (conn= in its log lines); it
	// becomes the Pending's ID. 0 (or an id already waiting) gets one
	// assigned.
	ConnID   uint64
	User     string
	Addr     string // client address, ip:port
	Database string
	AppName  string // application_name, as the client sent it
}

// Pending is a login waiting for approval.
type Pending struct {
	ID       uint64    `json:"id"`
	User     string    `json:"user"`
	Addr     string    `json:"addr"`
	Database string    `json:"database,omitempty"`
	AppName  string    `json:"application_name,omitempty"`
	Since    time.Time `json:"since"`
}

// Approval is one `pgmfa approve`.
type Approval struct {
	User, Code string
	// ConnID releases only this login (a Pending's ID).
	ConnID uint64
	// All releases every waiting login of User — including any started by
	// someone else who has User's password — and opens no remember window.
	// Without ConnID or All, an approval releases the login of User only
	// when exactly one waits.
	All bool
	// Approver is who approves ("uid:1000", "token"). An approval is
	// throttled by its approver's budget alone (Options.MaxFailures per
	// FailureWindow): failures are charged to it, never to the user's or an
	// address's budget. Empty: ApproverAddr.
	Approver string
}

// ApproveResult is the answer to an Approval. Outcome.OK: the code was
// accepted and Released are the logins released (possibly none, if they
// ended meanwhile). Reason ReasonSeveral: several logins of the user wait,
// none was released, the code was not checked (nor spent), and Waiting
// lists them.
type ApproveResult struct {
	Outcome
	Released []Pending
	Waiting  []Pending
}

type waiter struct {
	Pending
	release func(Outcome)
	done    chan struct{} // closed once release has returned, or by the cancel that withdrew it
}

// NewApprovals returns an empty set of waiting logins verified by g.
func NewApprovals(g *Guard) *Approvals {
	return &Approvals{g: g, waiting: map[uint64]*waiter{}}
}

// Wait registers a waiting login and returns it with the oldest other
// logins of the same user already waiting (at most MaxOthers, oldest first:
// a second login while one waits is worth a warning — it may be whoever has
// the user's password) and how many more wait beyond those. Only the
// oldest are returned so that a pool opening thousands of connections
// without a code does not copy every waiting login for each new one.
// release is called at most once, from the goroutine that calls Approve.
// cancel withdraws the login: after cancel returns, release either was
// never called and never will be, or has already returned. release must
// therefore not call cancel itself (it would wait for itself); cancel may be
// called any number of times.
func (a *Approvals) Wait(l Login, release func(Outcome)) (p Pending, others []Pending, more int, cancel func()) {
	since := a.g.opts.Now()
	var fleetID uint64
	if a.fleet != nil {
		// The fleet's id, so that `pgmfa approve --conn ID` names the
		// login on whichever instance it is given to. A store that cannot
		// take it leaves the login approvable on this instance only.
		var err error
		fleetID, others, err = a.fleet.Publish(Pending{User: l.User, Addr: l.Addr, Database: clip(l.Database), AppName: clip(l.AppName), Since: since})
		if err != nil {
			a.g.storeError(l.User, err)
			fleetID, others = 0, nil
		}
		sortPending(others)
		if len(others) > MaxOthers {
			others, more = others[:MaxOthers:MaxOthers], len(others)-MaxOthers
		}
	}
	a.mu.Lock()
	id := l.ConnID
	if fleetID != 0 {
		id = fleetID
	} else if a.fleet != nil {
		id = 0 // a local id must not collide with the fleet's
	}
	if _, taken := a.waiting[id]; id == 0 || taken {
		for {
			a.next++
			if _, taken := a.waiting[a.next]; !taken {
				break
			}
		}
		id = a.next
	}
	if fleetID == 0 {
		for _, w := range a.waiting {
			if w.User == l.User {
				others, more = keepOldest(others, w.Pending, more)
			}
		}
	}
	w := &waiter{
		Pending: Pending{ID: id, User: l.User, Addr: l.Addr, Database: clip(l.Database), AppName: clip(l.AppName), Since: since},
		release: release,
		done:    make(chan struct{}),
	}
	a.waiting[id] = w
	a.mu.Unlock()
	return w.Pending, others, more, func() { a.cancel(w) }
}

// MaxOthers is how many of the user's other waiting logins Wait returns.
const MaxOthers = 3

// keepOldest adds p to oldest (sorted, oldest first, at most MaxOthers),
// counting in more whichever of them drops out.
func keepOldest(oldest []Pending, p Pending, more int) ([]Pending, int) {
	if len(oldest) == MaxOthers {
		if !less(p, oldest[MaxOthers-1]) {
			return oldest, more + 1
		}
		oldest, more = oldest[:MaxOthers-1], more+1
	}
	i := sort.Search(len(oldest), func(i int) bool { return less(p, oldest[i]) })
	oldest = append(oldest, Pending{})
	copy(oldest[i+1:], oldest[i:])
	oldest[i] = p
	return oldest, more
}

func (a *Approvals) cancel(w *waiter) {
	a.mu.Lock()
	cur, still := a.waiting[w.ID]
	still = still && cur == w
	if still {
		delete(a.waiting, w.ID)
	}
	a.mu.Unlock()
	if still {
		// Ours to finish: release will never run.
		close(w.done)
		if a.fleet != nil && w.ID < localIDs {
			// cancel runs on event loops: the store's row goes off it.
			go func() {
				if err := a.fleet.Withdraw(w.ID); err != nil {
					a.g.storeError(w.User, err)
				}
			}()
		}
		return
	}
	// Approve took it (or an earlier cancel did): wait until its release
	// has run.
	<-w.done
}

// Approve verifies r.Code once for r.User (charged to r.Approver) and on
// success releases the login it names (see Approval) with an OK outcome.
// When the login it names does not wait — nobody waits, r.ConnID is not a
// waiting login of r.User, or several wait and neither ConnID nor All says
// which — the code is not checked (nor spent) and nothing counts as a
// failure. A wrong code releases nobody.
func (a *Approvals) Approve(r Approval) ApproveResult {
	if r.Approver == "" {
		r.Approver = ApproverAddr
	}
	if r.ConnID != 0 {
		r.All = false // a named login is the narrower reading
	}
	if a.fleet != nil {
		return a.approveFleet(r)
	}
	named, waiting := a.target(r)
	switch {
	case len(waiting) == 0:
		return ApproveResult{Outcome: notWaiting(r.User, r.ConnID)}
	case len(named) == 0:
		return ApproveResult{Outcome: several(r.User, len(waiting)), Waiting: waiting}
	}
	o := a.g.verify(attempt{user: r.User, code: r.Code, approver: r.Approver})
	if !o.OK {
		return ApproveResult{Outcome: o}
	}
	// Release only the logins named when the approval was asked for: one
	// arriving while the code was checked is not released with them, not
	// even by All.
	a.mu.Lock()
	var taken []*waiter
	for _, w := range named {
		if a.waiting[w.ID] == w {
			taken = append(taken, w)
			delete(a.waiting, w.ID)
		}
	}
	a.mu.Unlock()
	out := make([]Pending, 0, len(taken))
	for _, w := range taken {
		if !r.All {
			// The remember window covers the approved login's address
			// only; All opens none.
			a.g.rememberApproved(w.User, w.Addr)
		}
		w.run(Outcome{OK: true})
		out = append(out, w.Pending)
	}
	return ApproveResult{Outcome: Outcome{OK: true}, Released: out}
}

// target resolves the logins r names (none when it names none of several)
// and the waiting logins of r's user it chose from (none: nobody waits).
func (a *Approvals) target(r Approval) (named []*waiter, waiting []Pending) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if r.ConnID != 0 {
		if w, ok := a.waiting[r.ConnID]; ok && w.User == r.User {
			return []*waiter{w}, []Pending{w.Pending}
		}
		return nil, nil
	}
	var ws []*waiter
	for _, w := range a.waiting {
		if w.User == r.User {
			ws = append(ws, w)
		}
	}
	sort.Slice(ws, func(i, j int) bool { return less(ws[i].Pending, ws[j].Pending) })
	for _, w := range ws {
		waiting = append(waiting, w.Pending)
	}
	if r.All || len(ws) == 1 {
		return ws, waiting
	}
	return nil, waiting
}

// run calls release and then lets cancel return, even if release panics.
func (w *waiter) run(o Outcome) {
	defer close(w.done)
	w.release(o)
}

// List returns the waiting logins, oldest first: the whole fleet's when
// the store is shared (this instance's alone if the store cannot answer).
func (a *Approvals) List() []Pending {
	if a.fleet != nil {
		if ps, err := a.fleet.ListPending(); err == nil {
			local := a.localList()
			seen := map[uint64]bool{}
			for _, p := range ps {
				seen[p.ID] = true
			}
			for _, p := range local {
				if !seen[p.ID] {
					ps = append(ps, p)
				}
			}
			sortPending(ps)
			return ps
		} else {
			a.g.storeError("", err)
		}
	}
	return a.localList()
}

func (a *Approvals) localList() []Pending {
	a.mu.Lock()
	out := make([]Pending, 0, len(a.waiting))
	for _, w := range a.waiting {
		out = append(out, w.Pending)
	}
	a.mu.Unlock()
	sortPending(out)
	return out
}

// clip bounds a client-chosen name the way PostgreSQL does (NAMEDATALEN-1
// bytes), at a rune boundary: it is listed to approvers.
func clip(s string) string {
	const max = 63
	if len(s) <= max {
		return s
	}
	// A rune cut in two becomes invalid: drop it.
	return strings.ToValidUTF8(s[:max], "")
}

func sortPending(ps []Pending) {
	sort.Slice(ps, func(i, j int) bool { return less(ps[i], ps[j]) })
}

// less orders logins oldest first.
func less(a, b Pending) bool {
	if !a.Since.Equal(b.Since) {
		return a.Since.Before(b.Since)
	}
	return a.ID < b.ID
}

func notWaiting(user string, connID uint64) Outcome {
	if connID != 0 {
		return refuse(ReasonNotWaiting, fmt.Sprintf("no login %d of user %q is waiting for approval", connID, user),
			"list the waiting logins with: pgmfa approve --list")
	}
	return refuse(ReasonNotWaiting, fmt.Sprintf("no login of user %q is waiting for approval", user),
		"start the login first (without a code it waits), then approve it; list the waiting logins with: pgmfa approve --list")
}

func several(user string, n int) Outcome {
	return refuse(ReasonSeveral,
		fmt.Sprintf("%d logins of user %q are waiting for approval; none was released and the code was not used", n, user),
		fmt.Sprintf("approve the one you started: pgmfa approve --conn ID %s CODE (the ids are listed); one you do not recognise may be someone else who has the password", user))
}

// Decide releases the waiting login id of user without a code: its
// caller has already proved the user's second factor (the approval page,
// loop/web, signs the user in with a code). OK releases it as an approval
// does (opening the --mfa-remember window for its address); otherwise it
// ends with refusal o. Only a login waiting in this process can be
// decided (the page lists those); false: no such login of user waits here.
func (a *Approvals) Decide(user string, id uint64, approve bool, refusal Outcome) (Pending, bool) {
	a.mu.Lock()
	w, ok := a.waiting[id]
	if ok && w.User == user {
		delete(a.waiting, id)
	}
	a.mu.Unlock()
	if !ok || w.User != user {
		return Pending{}, false
	}
	if a.fleet != nil && id < localIDs {
		// The store's row of a login that no longer waits.
		go func() {
			if err := a.fleet.Withdraw(id); err != nil {
				a.g.storeError(user, err)
			}
		}()
	}
	if approve {
		a.g.rememberApproved(w.User, w.Addr)
		w.run(Outcome{OK: true})
	} else {
		w.run(refusal)
	}
	return w.Pending, true
}

// Local returns the logins of user waiting in this process, oldest first.
func (a *Approvals) Local(user string) []Pending {
	var out []Pending
	for _, p := range a.localList() {
		if p.User == user {
			out = append(out, p)
		}
	}
	return out
}
