package mfa

import (
	"fmt"
	"sort"
	"sync"
	"time"
)

// ApproverAddr is the client address approvals are verified (and throttled)
// under: every approver shares one budget.
const ApproverAddr = "admin"

// Approvals releases logins that arrived without a code when an operator (or
// the user) runs `pgmfa approve USER CODE`. Safe for concurrent use.
type Approvals struct {
	g *Guard

	mu      sync.Mutex
	next    uint64
	waiting map[uint64]*waiter
}

// Pending is a login waiting for approval.
type Pending struct {
	ID    uint64    `json:"id"`
	User  string    `json:"user"`
	Addr  string    `json:"addr"`
	Since time.Time `json:"since"`
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

// Wait registers a waiting login. release is called at most once, from the
// goroutine that calls Approve. cancel withdraws the login: after cancel
// returns, release either was never called and never will be, or has
// already returned. release must therefore not call cancel itself (it would
// wait for itself); cancel may be called any number of times.
func (a *Approvals) Wait(user, addr string, release func(Outcome)) (id uint64, cancel func()) {
	a.mu.Lock()
	a.next++
	w := &waiter{
		Pending: Pending{ID: a.next, User: user, Addr: addr, Since: a.g.opts.Now()},
		release: release,
		done:    make(chan struct{}),
	}
	a.waiting[w.ID] = w
	a.mu.Unlock()
	return w.ID, func() { a.cancel(w) }
}

func (a *Approvals) cancel(w *waiter) {
	a.mu.Lock()
	_, still := a.waiting[w.ID]
	delete(a.waiting, w.ID)
	a.mu.Unlock()
	if still {
		// Ours to finish: release will never run.
		close(w.done)
		return
	}
	// Approve took it (or an earlier cancel did): wait until its release
	// has run.
	<-w.done
}

// Approve verifies code once for user (Guard.Verify from ApproverAddr) and on
// success releases every login waiting for user, or only the one with
// connID when connID != 0, with an OK outcome. It returns the released
// logins. A wrong code releases nobody and counts as a failure; when nobody
// is waiting the code is not checked (nor spent) and the outcome's Reason is
// ReasonNotWaiting.
func (a *Approvals) Approve(user, code string, connID uint64) ([]Pending, Outcome) {
	if !a.anyWaiting(user, connID) {
		return nil, notWaiting(user, connID)
	}
	o := a.g.verify(user, ApproverAddr, code, false)
	if !o.OK {
		return nil, o
	}
	a.mu.Lock()
	var taken []*waiter
	for id, w := range a.waiting {
		if w.User == user && (connID == 0 || id == connID) {
			taken = append(taken, w)
			delete(a.waiting, id)
		}
	}
	a.mu.Unlock()
	sort.Slice(taken, func(i, j int) bool { return taken[i].ID < taken[j].ID })
	out := make([]Pending, 0, len(taken))
	for _, w := range taken {
		a.g.rememberApproved(w.User, w.Addr)
		w.run(Outcome{OK: true})
		out = append(out, w.Pending)
	}
	return out, Outcome{OK: true}
}

// run calls release and then lets cancel return, even if release panics.
func (w *waiter) run(o Outcome) {
	defer close(w.done)
	w.release(o)
}

func (a *Approvals) anyWaiting(user string, connID uint64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if connID != 0 {
		w, ok := a.waiting[connID]
		return ok && w.User == user
	}
	for _, w := range a.waiting {
		if w.User == user {
			return true
		}
	}
	return false
}

// List returns the waiting logins, oldest first.
func (a *Approvals) List() []Pending {
	a.mu.Lock()
	out := make([]Pending, 0, len(a.waiting))
	for _, w := range a.waiting {
		out = append(out, w.Pending)
	}
	a.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func notWaiting(user string, connID uint64) Outcome {
	if connID != 0 {
		return refuse(ReasonNotWaiting, fmt.Sprintf("no login %d of user %q is waiting for approval", connID, user),
			"list the waiting logins with: pgmfa approve --list")
	}
	return refuse(ReasonNotWaiting, fmt.Sprintf("no login of user %q is waiting for approval", user),
		"start the login first (without a code it waits), then approve it; list the waiting logins with: pgmfa approve --list")
}
