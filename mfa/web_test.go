package mfa

import (
	"testing"
	"time"
)

// A sign-in on the approval page spends the code and is throttled like a
// client, but opens no remember window for the browser's address.
func TestVerifyPage(t *testing.T) {
	clk := newClock(t0)
	g := NewGuard(Options{Now: clk.Now, Remember: time.Hour, MaxFailures: 2}, accounts{"alice": {Secret: secretA}})
	c := code(t, g, "alice", clk.Now())
	if o := g.VerifyPage("alice", "192.0.2.1:443", c); !o.OK {
		t.Fatal(o)
	}
	if g.Remembered("alice", "192.0.2.1:5000") {
		t.Fatal("the page opened a remember window")
	}
	// The same code on the wire from the same address: a replay, not the
	// pool rule.
	if o := g.Verify("alice", "192.0.2.1:5000", c); o.OK || o.Reason != ReasonReplayed {
		t.Fatalf("the page's code on the wire: %+v", o)
	}
	bad := otherCode(t, g, "alice", clk.Now())
	for i := 0; i < 2; i++ {
		if o := g.VerifyPage("alice", "192.0.2.9:443", bad); o.Reason != ReasonBadCode {
			t.Fatal(o)
		}
	}
	clk.Advance(30 * time.Second)
	if o := g.Verify("alice", "192.0.2.1:5000", code(t, g, "alice", clk.Now())); o.Reason != ReasonThrottled {
		t.Fatalf("the page's failures did not count against the user: %+v", o)
	}
}

// Decide releases or ends only a waiting login of the user it names.
func TestApprovalsDecide(t *testing.T) {
	g := NewGuard(Options{}, accounts{"alice": {Secret: secretA}})
	a := NewApprovals(g)
	got := make(chan Outcome, 2)
	p1, _, _, _ := a.Wait(Login{User: "alice", Addr: "192.0.2.1:1"}, func(o Outcome) { got <- o })
	p2, _, _, _ := a.Wait(Login{User: "alice", Addr: "192.0.2.1:2"}, func(o Outcome) { got <- o })
	if _, ok := a.Decide("bob", p1.ID, true, Outcome{}); ok {
		t.Fatal("bob decided alice's login")
	}
	if len(a.Local("alice")) != 2 || len(a.Local("bob")) != 0 {
		t.Fatal(a.Local("alice"))
	}
	if p, ok := a.Decide("alice", p1.ID, true, Outcome{}); !ok || p.ID != p1.ID || !(<-got).OK {
		t.Fatal("approve")
	}
	deny := refuse(ReasonDenied, "denied", "")
	if _, ok := a.Decide("alice", p2.ID, false, deny); !ok || (<-got).Reason != ReasonDenied {
		t.Fatal("deny")
	}
	if _, ok := a.Decide("alice", p2.ID, true, Outcome{}); ok || len(a.List()) != 0 {
		t.Fatal("decided twice")
	}
}
