package mfa

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// wait registers a waiting login of user from addr and returns its id.
func wait(a *Approvals, user, addr string, release func(Outcome)) (uint64, func()) {
	p, _, _, cancel := a.Wait(Login{User: user, Addr: addr, Database: "app"}, release)
	return p.ID, cancel
}

func TestApproveReleasesTheOneWaitingLogin(t *testing.T) {
	g, clk := newTestGuard(Options{}, "alice", "bob")
	a := NewApprovals(g)
	got := map[string]Outcome{}
	var mu sync.Mutex
	rel := func(name string) func(Outcome) {
		return func(o Outcome) { mu.Lock(); got[name] = o; mu.Unlock() }
	}
	id1, _ := wait(a, "alice", "192.0.2.1:1", rel("a1"))
	clk.Advance(time.Second)
	wait(a, "bob", "192.0.2.3:1", rel("b"))

	l := a.List()
	if len(l) != 2 || l[0].ID != id1 || l[0].User != "alice" || l[0].Addr != "192.0.2.1:1" || l[0].Database != "app" || !l[0].Since.Equal(t0) {
		t.Fatalf("List: %+v", l)
	}

	// A wrong code releases nobody and is charged to the approver.
	r := a.Approve(Approval{User: "alice", Code: otherCode(t, g, "alice", clk.Now()), Approver: "uid:7"})
	if r.OK || r.Reason != ReasonBadCode || len(r.Released) != 0 || len(got) != 0 {
		t.Fatalf("wrong code: %+v %v", r, got)
	}
	g.mu.Lock()
	nUser, nApprover := len(g.byUser.m["alice"]), len(g.byApprover.m["uid:7"])
	g.mu.Unlock()
	if nUser != 0 || nApprover != 1 {
		t.Fatalf("wrong approval counted %d failures for the user, %d for the approver", nUser, nApprover)
	}

	r = a.Approve(Approval{User: "alice", Code: code(t, g, "alice", clk.Now())})
	if !r.OK || len(r.Released) != 1 || r.Released[0].ID != id1 || !got["a1"].OK {
		t.Fatalf("approve: %+v %+v", r, got)
	}
	if _, ok := got["b"]; ok || len(a.List()) != 1 {
		t.Fatal("bob was released by alice's code")
	}
	// The code was spent.
	wait(a, "alice", "192.0.2.1:1", rel("a3"))
	if r := a.Approve(Approval{User: "alice", Code: code(t, g, "alice", clk.Now())}); r.Reason != ReasonReplayed {
		t.Fatalf("code reused for approval: %+v", r)
	}
}

// TestWaitReturnsOldestOthers: many logins of a user wait (a pool without
// a code); a new one gets the MaxOthers oldest, oldest first, and the count
// of the rest, whatever order the map holds them in.
func TestWaitReturnsOldestOthers(t *testing.T) {
	g, clk := newTestGuard(Options{}, "alice")
	a := NewApprovals(g)
	const n = 20
	for i := range n {
		// IDs out of age order: the age decides.
		a.Wait(Login{ConnID: uint64(100 + (i*7)%n), User: "alice"}, func(Outcome) {})
		a.Wait(Login{ConnID: uint64(1000 + i), User: "bob"}, func(Outcome) {})
		clk.Advance(time.Second)
	}
	_, others, more, _ := a.Wait(Login{ConnID: 99, User: "alice"}, func(Outcome) {})
	if len(others) != MaxOthers || more != n-MaxOthers {
		t.Fatalf("others %+v, more %d; want %d and %d", others, more, MaxOthers, n-MaxOthers)
	}
	for i, o := range others {
		if want := uint64(100 + (i*7)%n); o.ID != want || o.User != "alice" {
			t.Errorf("others[%d] = %+v, want id %d", i, o, want)
		}
	}
}

// TestApproveSeveralWaitingReleasesNone: two logins of alice wait (one may
// be whoever has her password). An approval that does not say which
// releases neither, lists both, and does not spend the code; --conn then
// releases exactly that one.
func TestApproveSeveralWaitingReleasesNone(t *testing.T) {
	g, clk := newTestGuard(Options{Remember: time.Minute}, "alice")
	a := NewApprovals(g)
	var released sync.Map
	p1, others, _, _ := a.Wait(Login{ConnID: 41, User: "alice", Addr: "192.0.2.1:5000", Database: "app", AppName: "psql"},
		func(o Outcome) { released.Store(41, o) })
	if p1.ID != 41 || len(others) != 0 {
		t.Fatalf("first wait: %+v, others %+v", p1, others)
	}
	clk.Advance(time.Second)
	p2, others, _, _ := a.Wait(Login{ConnID: 42, User: "alice", Addr: "198.51.100.9:6000", Database: "prod", AppName: "evil"},
		func(o Outcome) { released.Store(42, o) })
	if p2.ID != 42 || len(others) != 1 || others[0].ID != 41 || others[0].Addr != "192.0.2.1:5000" {
		t.Fatalf("second wait must report the first: %+v", others)
	}

	c := code(t, g, "alice", clk.Now())
	r := a.Approve(Approval{User: "alice", Code: c})
	if r.OK || r.Reason != ReasonSeveral || len(r.Released) != 0 || r.Hint == "" {
		t.Fatalf("ambiguous approval: %+v", r)
	}
	if len(r.Waiting) != 2 || r.Waiting[0].ID != 41 || r.Waiting[1].ID != 42 ||
		r.Waiting[1].Database != "prod" || r.Waiting[1].AppName != "evil" || !r.Waiting[0].Since.Equal(t0) {
		t.Fatalf("listing: %+v", r.Waiting)
	}
	released.Range(func(k, _ any) bool { t.Fatalf("login %v released by an ambiguous approval", k); return false })

	// The same code (not spent) with --conn releases exactly that login.
	r = a.Approve(Approval{User: "alice", Code: c, ConnID: 41})
	if !r.OK || len(r.Released) != 1 || r.Released[0].ID != 41 {
		t.Fatalf("--conn: %+v", r)
	}
	if _, ok := released.Load(41); !ok {
		t.Fatal("login 41 not released")
	}
	if _, ok := released.Load(42); ok {
		t.Fatal("login 42 released with 41")
	}
	// The remember window covers the approved login's address only.
	if !g.Remembered("alice", "192.0.2.1:5001") || g.Remembered("alice", "198.51.100.9:6001") {
		t.Fatal("remember grant not limited to the approved login's address")
	}
	if l := a.List(); len(l) != 1 || l[0].ID != 42 {
		t.Fatalf("still waiting: %+v", l)
	}
}

// TestApproveAll: --all releases every waiting login of the user and opens
// no remember window.
func TestApproveAll(t *testing.T) {
	g, clk := newTestGuard(Options{Remember: time.Minute}, "alice", "bob")
	a := NewApprovals(g)
	var n atomic.Int32
	wait(a, "alice", "192.0.2.1:1", func(Outcome) { n.Add(1) })
	wait(a, "alice", "192.0.2.2:1", func(Outcome) { n.Add(1) })
	wait(a, "bob", "192.0.2.3:1", func(Outcome) { n.Add(1) })
	r := a.Approve(Approval{User: "alice", Code: code(t, g, "alice", clk.Now()), All: true})
	if !r.OK || len(r.Released) != 2 || n.Load() != 2 {
		t.Fatalf("--all: %+v, %d released", r, n.Load())
	}
	if g.Remembered("alice", "192.0.2.1:1") || g.Remembered("alice", "192.0.2.2:1") {
		t.Fatal("--all opened a remember window")
	}
}

func TestApproveOneConnection(t *testing.T) {
	g, clk := newTestGuard(Options{}, "alice", "bob")
	a := NewApprovals(g)
	var n atomic.Int32
	id1, _ := wait(a, "alice", "192.0.2.1:1", func(Outcome) { n.Add(1) })
	wait(a, "alice", "192.0.2.1:2", func(Outcome) { n.Add(1) })
	bobID, _ := wait(a, "bob", "192.0.2.1:2", func(Outcome) { n.Add(1) })

	// Another user's connection id, or an unknown one: nothing checked.
	for _, id := range []uint64{bobID, 999} {
		if r := a.Approve(Approval{User: "alice", Code: "000000", ConnID: id}); r.Reason != ReasonNotWaiting || r.Hint == "" {
			t.Fatalf("conn %d: %+v", id, r)
		}
	}
	r := a.Approve(Approval{User: "alice", Code: code(t, g, "alice", clk.Now()), ConnID: id1, All: true})
	if !r.OK || len(r.Released) != 1 || r.Released[0].ID != id1 || n.Load() != 1 {
		t.Fatalf("%+v %d", r, n.Load())
	}
	// Nobody waiting: the code is not checked, so not spent and no failure.
	if r := a.Approve(Approval{User: "carol", Code: "000000"}); r.Reason != ReasonNotWaiting {
		t.Fatalf("%+v", r)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.byApprover.m) != 0 {
		t.Fatal("an approval that checked no code was charged")
	}
}

// TestWaitKeepsIDsUnique: a connection id already waiting is not reused.
func TestWaitKeepsIDsUnique(t *testing.T) {
	g, _ := newTestGuard(Options{}, "alice")
	a := NewApprovals(g)
	p1, _, _, cancel1 := a.Wait(Login{ConnID: 1, User: "alice"}, func(Outcome) {})
	p2, _, _, _ := a.Wait(Login{ConnID: 1, User: "alice"}, func(Outcome) {})
	if p1.ID != 1 || p2.ID == 1 {
		t.Fatalf("ids %d %d", p1.ID, p2.ID)
	}
	cancel1()
	if l := a.List(); len(l) != 1 || l[0].ID != p2.ID {
		t.Fatalf("cancel removed the wrong login: %+v", l)
	}
}

func TestCancelBeforeApprove(t *testing.T) {
	g, clk := newTestGuard(Options{}, "alice")
	a := NewApprovals(g)
	called := false
	_, cancel := wait(a, "alice", "192.0.2.1:1", func(Outcome) { called = true })
	cancel()
	cancel() // idempotent
	if len(a.List()) != 0 {
		t.Fatal("cancelled login still listed")
	}
	r := a.Approve(Approval{User: "alice", Code: code(t, g, "alice", clk.Now())})
	if called || len(r.Released) != 0 || r.Reason != ReasonNotWaiting {
		t.Fatalf("cancelled login released: %+v", r)
	}
}

// TestApproveRemembersReleasedAddress: with Remember, the released login's
// address is remembered, so the rest of a pool gets in without waiting.
func TestApproveRemembersReleasedAddress(t *testing.T) {
	g, clk := newTestGuard(Options{Remember: time.Minute}, "alice")
	a := NewApprovals(g)
	wait(a, "alice", "192.0.2.1:1", func(Outcome) {})
	c := code(t, g, "alice", clk.Now())
	a.Approve(Approval{User: "alice", Code: c})
	if !g.Remembered("alice", "192.0.2.1:2") {
		t.Fatal("released address not remembered")
	}
	if g.Remembered("alice", ApproverAddr) {
		t.Fatal("the approver's pseudo-address was remembered")
	}
	// The pool rule is for logins, not approvers: a spent code approves
	// nothing more.
	wait(a, "alice", "192.0.2.9:1", func(Outcome) {})
	if r := a.Approve(Approval{User: "alice", Code: c}); r.Reason != ReasonReplayed {
		t.Fatalf("second approval with the same code: %+v", r)
	}
}

// TestBadApprovalsDoNotLockTheUserOut: failed approvals are charged to the
// approver; the user, whose budget they used to spend, still logs in with a
// valid code, and the approver is throttled after its own budget.
func TestBadApprovalsDoNotLockTheUserOut(t *testing.T) {
	g, clk := newTestGuard(Options{}, "alice")
	a := NewApprovals(g)
	wait(a, "alice", "192.0.2.1:1", func(Outcome) {})
	bad := otherCode(t, g, "alice", clk.Now())
	for i := 0; i < DefaultMaxFailures; i++ {
		if r := a.Approve(Approval{User: "alice", Code: bad, Approver: "token"}); r.Reason != ReasonBadCode {
			t.Fatalf("bad approval %d: %+v", i, r)
		}
	}
	r := a.Approve(Approval{User: "alice", Code: code(t, g, "alice", clk.Now()), Approver: "token"})
	if r.Reason != ReasonThrottled || r.Hint == "" {
		t.Fatalf("approver past its budget: %+v", r)
	}
	// Another approver has its own budget.
	if r := a.Approve(Approval{User: "alice", Code: bad, Approver: "uid:0"}); r.Reason != ReasonBadCode {
		t.Fatalf("other approver: %+v", r)
	}
	if o := g.Verify("alice", "192.0.2.1:2", code(t, g, "alice", clk.Now())); !o.OK {
		t.Fatalf("the user was locked out by bad approvals: %+v", o)
	}
}

// TestApprovalRaces: logins cancel while approvals release them. Every
// release happens at most once, and never after its cancel returned. Run
// with -race.
func TestApprovalRaces(t *testing.T) {
	g, clk := newTestGuard(Options{MaxFailures: -1, MaxAddrFailures: -1}, "alice")
	a := NewApprovals(g)
	const rounds, perRound = 50, 20
	for r := 0; r < rounds; r++ {
		clk.Advance(30 * time.Second) // a fresh step per round
		c := code(t, g, "alice", clk.Now())
		var wg sync.WaitGroup
		var releases, cancelled atomic.Int32
		start := make(chan struct{})
		for i := 0; i < perRound; i++ {
			var calls atomic.Int32
			var cancelReturned atomic.Bool
			_, cancel := wait(a, "alice", fmt.Sprintf("192.0.2.1:%d", i), func(o Outcome) {
				if cancelReturned.Load() {
					t.Error("release after cancel returned")
				}
				if calls.Add(1) != 1 || !o.OK {
					t.Error("release called twice or not OK")
				}
				releases.Add(1)
			})
			if i%2 == 0 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					cancel()
					cancelReturned.Store(true)
					cancelled.Add(1)
				}()
			}
		}
		var res ApproveResult
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			res = a.Approve(Approval{User: "alice", Code: c, All: true})
		}()
		close(start)
		wg.Wait()
		if int(releases.Load()) != len(res.Released) {
			t.Fatalf("round %d: %d releases, %d reported", r, releases.Load(), len(res.Released))
		}
		if len(res.Released) < perRound/2 {
			t.Fatalf("round %d: only %d released; the uncancelled half must be", r, len(res.Released))
		}
		// Whatever is left (nothing) is cleaned up by the next round.
		if l := a.List(); len(l) != 0 {
			t.Fatalf("round %d: %d still waiting", r, len(l))
		}
	}
}

// blockingClaimer is an in-memory StepClaimer whose claims wait for a
// signal, to hold an approval between its check of the code and the
// release.
type blockingClaimer struct {
	accounts
	entered chan struct{}
	proceed chan struct{}
	mu      sync.Mutex
	last    map[string]int64
}

func (b *blockingClaimer) ClaimStep(user string, step int64, _ string) (bool, error) {
	b.entered <- struct{}{}
	<-b.proceed
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.last[user] >= step {
		return false, nil
	}
	b.last[user] = step
	return true, nil
}

// TestApproveBindsToTheLoginItNamed: a login of the same user that starts
// waiting while the approval's code is being checked is not released by it
// (with or without All): the approval covers what it was asked about.
func TestApproveBindsToTheLoginItNamed(t *testing.T) {
	for _, all := range []bool{false, true} {
		clk := newClock(t0)
		bc := &blockingClaimer{
			accounts: accounts{"alice": {Secret: b32("secret-of-alice-padding")}},
			entered:  make(chan struct{}), proceed: make(chan struct{}), last: map[string]int64{},
		}
		g := NewGuard(Options{Now: clk.Now}, bc)
		a := NewApprovals(g)
		var late atomic.Bool
		id1, _ := wait(a, "alice", "192.0.2.1:1", func(Outcome) {})
		res := make(chan ApproveResult, 1)
		go func() { res <- a.Approve(Approval{User: "alice", Code: code(t, g, "alice", clk.Now()), All: all}) }()
		<-bc.entered // the code is being claimed
		id2, _ := wait(a, "alice", "198.51.100.9:1", func(Outcome) { late.Store(true) })
		close(bc.proceed)
		r := <-res
		if !r.OK || len(r.Released) != 1 || r.Released[0].ID != id1 || late.Load() {
			t.Fatalf("all=%v: %+v, late login released: %v", all, r, late.Load())
		}
		if l := a.List(); len(l) != 1 || l[0].ID != id2 {
			t.Fatalf("all=%v: waiting %+v", all, l)
		}
	}
}
