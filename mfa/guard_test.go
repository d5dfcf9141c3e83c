package mfa

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

func newTestGuard(opts Options, users ...string) (*Guard, *clock) {
	clk := newClock(t0)
	opts.Now = clk.Now
	a := accounts{}
	for i, u := range users {
		// Distinct secrets per user.
		a[u] = Account{Secret: b32(fmt.Sprintf("secret-of-%02d-%s-padding", i, u))}
	}
	return NewGuard(opts, a), clk
}

func TestVerifySkewWindow(t *testing.T) {
	for _, skew := range []int{NoSkew, 0, 1, 2} {
		t.Run(fmt.Sprint("skew=", skew), func(t *testing.T) {
			eff := skew
			switch skew {
			case 0:
				eff = DefaultSkew // zero means the default
			case NoSkew:
				eff = 0 // the current step only
			}
			for d := -eff - 1; d <= eff+1; d++ {
				g, clk := newTestGuard(Options{Skew: skew}, "alice")
				// Mid-step, so the edges are unambiguous.
				clk.Advance(15 * time.Second)
				c := code(t, g, "alice", clk.Now().Add(time.Duration(d)*30*time.Second))
				o := g.Verify("alice", "192.0.2.1:1", c)
				want := d >= -eff && d <= eff
				if o.OK != want {
					t.Errorf("code %d steps away: OK=%v, want %v (%+v)", d, o.OK, want, o)
				}
				if !want && o.Reason != ReasonBadCode {
					t.Errorf("code %d steps away: reason %q", d, o.Reason)
				}
			}
		})
	}
}

func TestVerifyReplay(t *testing.T) {
	g, clk := newTestGuard(Options{}, "alice", "bob")
	c := code(t, g, "alice", clk.Now())
	if o := g.Verify("alice", "192.0.2.1:1", c); !o.OK || o.Reason != "" {
		t.Fatalf("first use: %+v", o)
	}
	o := g.Verify("alice", "192.0.2.1:2", c)
	if o.OK || o.Reason != ReasonReplayed || o.Code != "28000" || o.Hint == "" {
		t.Fatalf("second use: %+v", o)
	}
	// From elsewhere too.
	if o := g.Verify("alice", "198.51.100.7:1", c); o.Reason != ReasonReplayed {
		t.Fatalf("second use from another address: %+v", o)
	}
	// bob's state is his own.
	if o := g.Verify("bob", "192.0.2.1:1", code(t, g, "bob", clk.Now())); !o.OK {
		t.Fatalf("bob: %+v", o)
	}

	// A newer step accepted makes an older one (still within skew) a replay.
	clk.Advance(30 * time.Second)
	newer := code(t, g, "alice", clk.Now())
	older := code(t, g, "alice", clk.Now().Add(-30*time.Second))
	if older != c {
		t.Fatal("test setup: the older code should be the first one")
	}
	if o := g.Verify("alice", "192.0.2.1:1", newer); !o.OK {
		t.Fatalf("newer step: %+v", o)
	}
	// Accept the next step early (skew +1), then the current one is old.
	g2, clk2 := newTestGuard(Options{}, "alice")
	next := code(t, g2, "alice", clk2.Now().Add(30*time.Second))
	cur := code(t, g2, "alice", clk2.Now())
	if o := g2.Verify("alice", "192.0.2.1:1", next); !o.OK {
		t.Fatalf("next step: %+v", o)
	}
	if o := g2.Verify("alice", "192.0.2.1:1", cur); o.Reason != ReasonReplayed {
		t.Fatalf("older step after a newer one: %+v", o)
	}

	// Replays do not count as failures: many of them leave a fresh code usable.
	for i := 0; i < 20; i++ {
		g2.Verify("alice", "192.0.2.1:1", cur)
	}
	clk2.Advance(60 * time.Second)
	if o := g2.Verify("alice", "192.0.2.1:1", code(t, g2, "alice", clk2.Now())); !o.OK {
		t.Fatalf("fresh code after replays: %+v", o)
	}
}

func TestThrottlePerUser(t *testing.T) {
	g, clk := newTestGuard(Options{MaxFailures: 3, FailureWindow: 5 * time.Minute}, "alice", "bob")
	for i := 0; i < 3; i++ {
		// Different addresses: the per-user budget is global.
		addr := fmt.Sprintf("192.0.2.%d:4000", i+1)
		if o := g.Verify("alice", addr, otherCode(t, g, "alice", clk.Now())); o.Reason != ReasonBadCode {
			t.Fatalf("failure %d: %+v", i+1, o)
		}
		clk.Advance(time.Minute)
	}
	// Now at t0+3m; the first failure was at t0, so the block lifts at t0+5m.
	right := code(t, g, "alice", clk.Now())
	o := g.Verify("alice", "203.0.113.9:1", right)
	if o.OK || o.Reason != ReasonThrottled || o.Code != "28000" {
		t.Fatalf("correct code while throttled: %+v", o)
	}
	wantUntil := t0.Add(5 * time.Minute).Format("15:04:05 UTC")
	if !strings.Contains(o.Hint, wantUntil) || !strings.Contains(o.Hint, "2m0s") || !strings.Contains(o.Message, "alice") {
		t.Fatalf("throttle message does not say when: %+v", o)
	}
	// Other users are unaffected.
	if o := g.Verify("bob", "203.0.113.9:1", code(t, g, "bob", clk.Now())); !o.OK {
		t.Fatalf("bob throttled by alice's failures: %+v", o)
	}
	clk.Advance(2*time.Minute - time.Second)
	if o := g.Verify("alice", "203.0.113.9:1", code(t, g, "alice", clk.Now())); o.Reason != ReasonThrottled {
		t.Fatalf("one second before the window ends: %+v", o)
	}
	clk.Advance(time.Second)
	if o := g.Verify("alice", "203.0.113.9:1", code(t, g, "alice", clk.Now())); !o.OK {
		t.Fatalf("after the window: %+v", o)
	}
}

func TestThrottleSlidingAndReset(t *testing.T) {
	g, clk := newTestGuard(Options{MaxFailures: 2, FailureWindow: time.Minute}, "alice")
	bad := func() Outcome { return g.Verify("alice", "192.0.2.1:1", otherCode(t, g, "alice", clk.Now())) }
	bad()
	clk.Advance(50 * time.Second)
	bad()
	if o := g.Verify("alice", "192.0.2.1:1", code(t, g, "alice", clk.Now())); o.Reason != ReasonThrottled {
		t.Fatalf("want throttled: %+v", o)
	}
	// The first failure leaves the window at +60s; one remains, so one
	// more attempt is allowed.
	clk.Advance(10 * time.Second)
	if o := g.Verify("alice", "192.0.2.1:1", code(t, g, "alice", clk.Now())); !o.OK {
		t.Fatalf("after the oldest failure left the window: %+v", o)
	}
	// A success forgave the user's failures: two more before a block.
	clk.Advance(30 * time.Second)
	bad()
	if o := g.Verify("alice", "192.0.2.1:1", code(t, g, "alice", clk.Now())); !o.OK {
		t.Fatalf("success did not reset the user's failures: %+v", o)
	}
}

func TestThrottlePerAddress(t *testing.T) {
	users := []string{"u0", "u1", "u2", "u3", "victim"}
	g, clk := newTestGuard(Options{MaxFailures: 100, MaxAddrFailures: 4}, users...)
	for i := 0; i < 4; i++ {
		u := users[i]
		// Same IP, different ports.
		if o := g.Verify(u, fmt.Sprintf("192.0.2.1:%d", 1000+i), otherCode(t, g, u, clk.Now())); o.Reason != ReasonBadCode {
			t.Fatalf("failure %d: %+v", i, o)
		}
	}
	right := code(t, g, "victim", clk.Now())
	o := g.Verify("victim", "192.0.2.1:9999", right)
	if o.Reason != ReasonThrottled || !strings.Contains(o.Message, "address") {
		t.Fatalf("correct code from a throttled address: %+v", o)
	}
	// Another address is fine.
	if o := g.Verify("victim", "192.0.2.2:9999", right); !o.OK {
		t.Fatalf("other address: %+v", o)
	}
	clk.Advance(DefaultFailureWindow)
	if o := g.Verify("u0", "192.0.2.1:1", code(t, g, "u0", clk.Now())); !o.OK {
		t.Fatalf("after the window: %+v", o)
	}
}

func TestThrottleAddressKeys(t *testing.T) {
	cases := []struct{ a, b string }{
		{"192.0.2.1:1", "192.0.2.1:2"},
		{"[::ffff:192.0.2.1]:1", "192.0.2.1:2"},
		{"[2001:db8:1:2::1]:1", "[2001:db8:1:2:ffff::9]:2"}, // same /64
		{"/run/pg/.s.PGSQL.5432", "/run/pg/.s.PGSQL.5432"},
		{"", "@"},
	}
	for _, c := range cases {
		if throttleKey(c.a) != throttleKey(c.b) {
			t.Errorf("%q and %q should share a throttle key: %q %q", c.a, c.b, throttleKey(c.a), throttleKey(c.b))
		}
	}
	if throttleKey("[2001:db8:1:2::1]:1") == throttleKey("[2001:db8:1:3::1]:1") {
		t.Error("different /64s share a key")
	}
	if rememberKey("u", "[2001:db8:1:2::1]:1") == rememberKey("u", "[2001:db8:1:2::2]:1") {
		t.Error("remember is per exact IP")
	}
}

func TestMalformedAndNotEnrolled(t *testing.T) {
	g, clk := newTestGuard(Options{MaxFailures: 2, MaxAddrFailures: 3}, "alice")
	for _, c := range []string{"12345", "1234567", "12345a", ""} {
		o := g.Verify("alice", "192.0.2.1:1", c)
		if c != "" && o.Reason != ReasonMalformed && o.Reason != ReasonThrottled {
			t.Fatalf("%q: %+v", c, o)
		}
	}
	// Those were failures: alice is throttled now.
	if o := g.Verify("alice", "192.0.2.9:1", code(t, g, "alice", clk.Now())); o.Reason != ReasonThrottled {
		t.Fatalf("malformed codes did not count: %+v", o)
	}
	// Surrounding space is tolerated.
	g, clk = newTestGuard(Options{}, "alice")
	if o := g.Verify("alice", "192.0.2.1:1", " "+code(t, g, "alice", clk.Now())+" "); !o.OK {
		t.Fatalf("code with spaces: %+v", o)
	}
	o := g.Verify("mallory", "192.0.2.1:1", "123456")
	if o.Reason != ReasonNotEnrolled || !strings.Contains(o.Hint, "pgmfa enroll mallory") {
		t.Fatalf("not enrolled: %+v", o)
	}
	if g.Enrolled("mallory") || !g.Enrolled("alice") {
		t.Fatal("Enrolled")
	}
}

func TestRememberWindow(t *testing.T) {
	g, clk := newTestGuard(Options{Remember: time.Minute}, "alice", "bob")
	if g.Remembered("alice", "192.0.2.1:1") {
		t.Fatal("remembered before any success")
	}
	if o := g.Verify("alice", "192.0.2.1:1", code(t, g, "alice", clk.Now())); !o.OK {
		t.Fatal(o)
	}
	if !g.Remembered("alice", "192.0.2.1:777") {
		t.Fatal("same user, same IP, other port: not remembered")
	}
	if g.Remembered("alice", "192.0.2.2:1") || g.Remembered("bob", "192.0.2.1:1") {
		t.Fatal("remembered for another address or user")
	}
	clk.Advance(59 * time.Second)
	if !g.Remembered("alice", "192.0.2.1:1") {
		t.Fatal("forgotten inside the window")
	}
	// Remembered refreshes nothing: the window runs from the code.
	clk.Advance(time.Second)
	if g.Remembered("alice", "192.0.2.1:1") {
		t.Fatal("remembered after the window")
	}

	// Off by default.
	g, clk = newTestGuard(Options{}, "alice")
	g.Verify("alice", "192.0.2.1:1", code(t, g, "alice", clk.Now()))
	if g.Remembered("alice", "192.0.2.1:1") {
		t.Fatal("remembered with Remember = 0")
	}
}

func TestRememberEndsWithRotation(t *testing.T) {
	clk := newClock(t0)
	a := accounts{"alice": {Secret: secretA}}
	g := NewGuard(Options{Remember: time.Hour, Now: clk.Now}, a)
	g.Verify("alice", "192.0.2.1:1", code(t, g, "alice", clk.Now()))
	if !g.Remembered("alice", "192.0.2.1:1") {
		t.Fatal("not remembered")
	}
	a["alice"] = Account{Secret: b32("a brand new secret!!")}
	if g.Remembered("alice", "192.0.2.1:1") {
		t.Fatal("remembered across a secret rotation")
	}
	delete(a, "alice")
	if g.Remembered("alice", "192.0.2.1:1") {
		t.Fatal("remembered after removal")
	}
}

// TestPoolRule: 20 connections of a pool arrive together with one code.
// With Remember all pass (one by the code, the rest as remembered); without,
// exactly one passes and the rest are replays.
func TestPoolRule(t *testing.T) {
	for _, remember := range []time.Duration{0, time.Minute} {
		t.Run(fmt.Sprint("remember=", remember), func(t *testing.T) {
			g, clk := newTestGuard(Options{Remember: remember}, "alice")
			c := code(t, g, "alice", clk.Now())
			const n = 20
			var wg sync.WaitGroup
			out := make(chan Outcome, n)
			start := make(chan struct{})
			for i := 0; i < n; i++ {
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					<-start
					out <- g.Verify("alice", fmt.Sprintf("192.0.2.1:%d", 5000+i), c)
				}(i)
			}
			close(start)
			wg.Wait()
			close(out)
			counts := map[string]int{}
			for o := range out {
				if o.OK {
					counts["ok/"+o.Reason]++
				} else {
					counts[o.Reason]++
				}
			}
			want := map[string]int{"ok/": 1, ReasonReplayed: n - 1}
			if remember > 0 {
				want = map[string]int{"ok/": 1, "ok/" + ReasonRemembered: n - 1}
			}
			if fmt.Sprint(counts) != fmt.Sprint(want) {
				t.Fatalf("got %v, want %v", counts, want)
			}
			// The same code from another address is a replay either way.
			if o := g.Verify("alice", "198.51.100.1:1", c); o.Reason != ReasonReplayed {
				t.Fatalf("pool code from another address: %+v", o)
			}
		})
	}
}

// TestPoolRuleOnlyForTheSameCode: while remembered, a different wrong code
// is still a failure, and an older used code is still a replay.
func TestPoolRuleOnlyForTheSameCode(t *testing.T) {
	g, clk := newTestGuard(Options{Remember: time.Hour}, "alice")
	old := code(t, g, "alice", clk.Now())
	g.Verify("alice", "192.0.2.1:1", old)
	clk.Advance(30 * time.Second)
	cur := code(t, g, "alice", clk.Now())
	if o := g.Verify("alice", "192.0.2.1:1", cur); !o.OK || o.Reason != "" {
		t.Fatalf("fresh code: %+v", o)
	}
	if o := g.Verify("alice", "192.0.2.1:1", old); o.Reason != ReasonReplayed {
		t.Fatalf("older code while remembered: %+v", o)
	}
	if o := g.Verify("alice", "192.0.2.1:1", otherCode(t, g, "alice", clk.Now())); o.Reason != ReasonBadCode {
		t.Fatalf("wrong code while remembered: %+v", o)
	}
}

func TestOutcomeHintsNameDigits(t *testing.T) {
	clk := newClock(t0)
	g := NewGuard(Options{Now: clk.Now}, accounts{"e": {Secret: secretA, Digits: 8, Period: time.Minute, Algorithm: "SHA256"}})
	o := g.Verify("e", "192.0.2.1:1", "123456")
	if o.Reason != ReasonMalformed || !strings.Contains(o.Message, "8 digits") || !strings.Contains(o.Hint, "pgmfa.code=NNNNNNNN") {
		t.Fatalf("%+v", o)
	}
	if o := g.Verify("e", "192.0.2.1:1", code(t, g, "e", clk.Now())); !o.OK {
		t.Fatalf("per-account parameters: %+v", o)
	}
}

// TestSweepBoundsMemory: after the window, old failure and remember entries
// are dropped.
func TestSweepBoundsMemory(t *testing.T) {
	g, clk := newTestGuard(Options{Remember: time.Minute, MaxAddrFailures: 1000000}, "alice")
	for i := 0; i < sweepEvery-1; i++ {
		g.Verify("nobody", fmt.Sprintf("10.0.%d.%d:1", i/256, i%256), "123456")
	}
	g.mu.Lock()
	n := len(g.byAddr.m)
	g.mu.Unlock()
	if n != sweepEvery-1 {
		t.Fatalf("%d address entries", n)
	}
	clk.Advance(DefaultFailureWindow)
	g.Verify("alice", "192.0.2.1:1", code(t, g, "alice", clk.Now()))
	g.mu.Lock()
	n = len(g.byAddr.m)
	g.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d address entries after the window and a sweep", n)
	}
}
