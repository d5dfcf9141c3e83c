package mfa

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestApproveReleasesWaitingLogins(t *testing.T) {
	g, clk := newTestGuard(Options{}, "alice", "bob")
	a := NewApprovals(g)
	got := map[string]Outcome{}
	var mu sync.Mutex
	rel := func(name string) func(Outcome) {
		return func(o Outcome) { mu.Lock(); got[name] = o; mu.Unlock() }
	}
	id1, _ := a.Wait("alice", "192.0.2.1:1", rel("a1"))
	clk.Advance(time.Second)
	id2, _ := a.Wait("alice", "192.0.2.2:1", rel("a2"))
	a.Wait("bob", "192.0.2.3:1", rel("b"))

	l := a.List()
	if len(l) != 3 || l[0].ID != id1 || l[1].ID != id2 || l[0].User != "alice" || l[0].Addr != "192.0.2.1:1" || !l[0].Since.Equal(t0) {
		t.Fatalf("List: %+v", l)
	}

	// A wrong code releases nobody and counts as a failure.
	released, o := a.Approve("alice", otherCode(t, g, "alice", clk.Now()), 0)
	if o.OK || o.Reason != ReasonBadCode || len(released) != 0 || len(got) != 0 {
		t.Fatalf("wrong code: %+v %v %v", o, released, got)
	}
	g.mu.Lock()
	n := len(g.byUser.m["alice"])
	g.mu.Unlock()
	if n != 1 {
		t.Fatalf("wrong approval counted %d failures", n)
	}

	released, o = a.Approve("alice", code(t, g, "alice", clk.Now()), 0)
	if !o.OK || len(released) != 2 || released[0].ID != id1 || released[1].ID != id2 {
		t.Fatalf("approve: %+v %+v", o, released)
	}
	if !got["a1"].OK || !got["a2"].OK {
		t.Fatalf("releases: %+v", got)
	}
	if _, ok := got["b"]; ok || len(a.List()) != 1 {
		t.Fatal("bob was released by alice's code")
	}
	// The code was spent.
	a.Wait("alice", "192.0.2.1:1", rel("a3"))
	if _, o := a.Approve("alice", code(t, g, "alice", clk.Now()), 0); o.Reason != ReasonReplayed {
		t.Fatalf("code reused for approval: %+v", o)
	}
}

func TestApproveOneConnection(t *testing.T) {
	g, clk := newTestGuard(Options{}, "alice", "bob")
	a := NewApprovals(g)
	var n atomic.Int32
	id1, _ := a.Wait("alice", "192.0.2.1:1", func(Outcome) { n.Add(1) })
	a.Wait("alice", "192.0.2.1:2", func(Outcome) { n.Add(1) })
	bobID, _ := a.Wait("bob", "192.0.2.1:2", func(Outcome) { n.Add(1) })

	// Another user's connection id, or an unknown one: nothing checked.
	for _, id := range []uint64{bobID, 999} {
		if _, o := a.Approve("alice", "000000", id); o.Reason != ReasonNotWaiting || o.Hint == "" {
			t.Fatalf("conn %d: %+v", id, o)
		}
	}
	released, o := a.Approve("alice", code(t, g, "alice", clk.Now()), id1)
	if !o.OK || len(released) != 1 || released[0].ID != id1 || n.Load() != 1 {
		t.Fatalf("%+v %+v %d", o, released, n.Load())
	}
	// Nobody waiting: the code is not checked, so not spent and no failure.
	if _, o := a.Approve("carol", "000000", 0); o.Reason != ReasonNotWaiting {
		t.Fatalf("%+v", o)
	}
}

func TestCancelBeforeApprove(t *testing.T) {
	g, clk := newTestGuard(Options{}, "alice")
	a := NewApprovals(g)
	called := false
	_, cancel := a.Wait("alice", "192.0.2.1:1", func(Outcome) { called = true })
	cancel()
	cancel() // idempotent
	if len(a.List()) != 0 {
		t.Fatal("cancelled login still listed")
	}
	released, o := a.Approve("alice", code(t, g, "alice", clk.Now()), 0)
	if called || len(released) != 0 || o.Reason != ReasonNotWaiting {
		t.Fatalf("cancelled login released: %v %+v", released, o)
	}
}

// TestApproveRemembersReleasedAddresses: with Remember, a released login's
// address is remembered, so the rest of a pool gets in without waiting.
func TestApproveRemembersReleasedAddresses(t *testing.T) {
	g, clk := newTestGuard(Options{Remember: time.Minute}, "alice")
	a := NewApprovals(g)
	a.Wait("alice", "192.0.2.1:1", func(Outcome) {})
	c := code(t, g, "alice", clk.Now())
	a.Approve("alice", c, 0)
	if !g.Remembered("alice", "192.0.2.1:2") {
		t.Fatal("released address not remembered")
	}
	if g.Remembered("alice", ApproverAddr) {
		t.Fatal("the approver's pseudo-address was remembered")
	}
	// The pool rule is for logins, not approvers: a spent code approves
	// nothing more.
	a.Wait("alice", "192.0.2.9:1", func(Outcome) {})
	if _, o := a.Approve("alice", c, 0); o.Reason != ReasonReplayed {
		t.Fatalf("second approval with the same code: %+v", o)
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
			_, cancel := a.Wait("alice", fmt.Sprintf("192.0.2.1:%d", i), func(o Outcome) {
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
		var released []Pending
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			released, _ = a.Approve("alice", c, 0)
		}()
		close(start)
		wg.Wait()
		if int(releases.Load()) != len(released) {
			t.Fatalf("round %d: %d releases, %d reported", r, releases.Load(), len(released))
		}
		if len(released) < perRound/2 {
			t.Fatalf("round %d: only %d released; the uncancelled half must be", r, len(released))
		}
		// Whatever is left (nothing) is cleaned up by the next round.
		if l := a.List(); len(l) != 0 {
			t.Fatalf("round %d: %d still waiting", r, len(l))
		}
	}
}
