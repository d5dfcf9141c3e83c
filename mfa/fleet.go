package mfa

import "sort"

// Fleet is implemented by stores that share the logins waiting for
// approval across every instance of a fleet (the PostgreSQL store), so that
// `pgmfa approve` given to any instance releases a login held by any other,
// and `pgmfa approve --list` shows them all.
//
// A release is a mark in the store, not a deletion: the instance holding
// the login learns of it from a notification (Approvals.Notify) or, after a
// lost connection, by asking (Approvals.Reconcile → Released), and only a
// login marked released is let in. A row that disappears (pruned, deleted
// by hand) releases nothing: fail closed.
type Fleet interface {
	// Publish records a waiting login and returns its fleet-wide id and the
	// other logins of the same user already waiting, oldest first.
	Publish(p Pending) (id uint64, others []Pending, err error)
	// Withdraw deletes a waiting login's record (it ended, or its release
	// was consumed).
	Withdraw(id uint64) error
	// ListPending returns every login waiting and not yet released.
	ListPending() ([]Pending, error)
	// Release marks the logins ids released, if they still wait, tells
	// their instances, and returns those it marked.
	Release(ids []uint64) ([]Pending, error)
	// Released returns those of ids that are marked released.
	Released(ids []uint64) ([]uint64, error)
}

// localIDs is where ids of logins kept only in this process start when
// the fleet's store could not record them (never a fleet id).
const localIDs = 1 << 62

// NewFleetApprovals returns Approvals whose waiting logins are shared
// through fleet. The caller feeds the store's release notifications to
// Notify, and calls Reconcile after it (re)connects to them.
func NewFleetApprovals(g *Guard, fleet Fleet) *Approvals {
	a := NewApprovals(g)
	a.fleet = fleet
	a.next = localIDs
	return a
}

// Notify releases the logins ids held by this instance (the store marked
// them released; ids held elsewhere are ignored).
func (a *Approvals) Notify(ids []uint64) {
	a.mu.Lock()
	var taken []*waiter
	for _, id := range ids {
		if w, ok := a.waiting[id]; ok {
			taken = append(taken, w)
			delete(a.waiting, id)
		}
	}
	a.mu.Unlock()
	for _, w := range taken {
		w.run(Outcome{OK: true})
		if err := a.fleet.Withdraw(w.ID); err != nil {
			a.g.storeError(w.User, err)
		}
	}
}

// Reconcile asks the store which of this instance's waiting logins were
// released while notifications could not arrive, and releases them.
func (a *Approvals) Reconcile() error {
	a.mu.Lock()
	var ids []uint64
	for id := range a.waiting {
		if id < localIDs {
			ids = append(ids, id)
		}
	}
	a.mu.Unlock()
	if len(ids) == 0 {
		return nil
	}
	released, err := a.fleet.Released(ids)
	if err != nil {
		return err
	}
	a.Notify(released)
	return nil
}

// approveFleet is Approve over the fleet's waiting logins: resolve the
// target from the store, verify the code once, mark the targets released
// (their instances let them in), and release at once those held here.
func (a *Approvals) approveFleet(r Approval) ApproveResult {
	all, err := a.fleet.ListPending()
	if err != nil {
		a.g.storeError(r.User, err)
		return ApproveResult{Outcome: storeDown(r.User)}
	}
	var mine []Pending
	for _, p := range all {
		if p.User == r.User && (r.ConnID == 0 || p.ID == r.ConnID) {
			mine = append(mine, p)
		}
	}
	sort.Slice(mine, func(i, j int) bool { return less(mine[i], mine[j]) })
	switch {
	case len(mine) == 0:
		return ApproveResult{Outcome: notWaiting(r.User, r.ConnID)}
	case len(mine) > 1 && !r.All:
		return ApproveResult{Outcome: several(r.User, len(mine)), Waiting: mine}
	}
	o := a.g.verify(attempt{user: r.User, code: r.Code, approver: r.Approver})
	if !o.OK {
		return ApproveResult{Outcome: o}
	}
	ids := make([]uint64, len(mine))
	for i, p := range mine {
		ids[i] = p.ID
	}
	taken, err := a.fleet.Release(ids)
	if err != nil {
		a.g.storeError(r.User, err)
		return ApproveResult{Outcome: storeDown(r.User)}
	}
	got := make([]uint64, len(taken))
	for i, p := range taken {
		if !r.All {
			a.g.rememberApproved(p.User, p.Addr)
		}
		got[i] = p.ID
	}
	a.Notify(got)
	sortPending(taken)
	return ApproveResult{Outcome: Outcome{OK: true}, Released: taken}
}
