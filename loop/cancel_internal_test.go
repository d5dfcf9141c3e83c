package loop

import (
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// TestCancelRouting: keys of this process's sessions are forwarded without
// limit; other keys are forwarded within the per-source rate limit.
func TestCancelRouting(t *testing.T) {
	var cm cancelMap
	now := time.Unix(1000, 0)
	key := &pgproto3.BackendKeyData{ProcessID: 42, SecretKey: []byte{1, 2, 3, 4}}
	remove := cm.add(key, 7)
	own := &pgproto3.CancelRequest{ProcessID: 42, SecretKey: []byte{1, 2, 3, 4}}
	for i := 0; i < 1000; i++ {
		if v := cm.route(own, "10.0.0.1:5000", now); !v.forward || !v.known || v.conn != 7 {
			t.Fatalf("own key, request %d: %+v", i, v)
		}
	}
	// Same PID, other secret: unknown, so limited.
	guess := &pgproto3.CancelRequest{ProcessID: 42, SecretKey: []byte{1, 2, 3, 5}}
	allowed := 0
	for i := 0; i < 1000; i++ {
		if v := cm.route(guess, "10.0.0.1:5000", now); v.forward {
			if v.known {
				t.Fatal("a wrong secret matched")
			}
			allowed++
		}
	}
	if allowed != int(unknownCancelBurst) {
		t.Fatalf("%d unknown-key cancels forwarded at once, want the burst %v", allowed, unknownCancelBurst)
	}
	// The limit is per source: another address has its own bucket, another
	// port of the same address does not.
	if !cm.route(guess, "10.0.0.2:5000", now).forward {
		t.Fatal("another source was limited")
	}
	if cm.route(guess, "10.0.0.1:6000", now).forward {
		t.Fatal("another port of a limited address was not limited")
	}
	// Refill: one second later, rate more.
	now = now.Add(time.Second)
	allowed = 0
	for i := 0; i < 100; i++ {
		if cm.route(guess, "10.0.0.1:5000", now).forward {
			allowed++
		}
	}
	if allowed != int(unknownCancelRate) {
		t.Fatalf("%d forwarded after 1s, want %v", allowed, unknownCancelRate)
	}
	// Known keys stay unlimited while the source is limited.
	if !cm.route(own, "10.0.0.1:5000", now).forward {
		t.Fatal("own key limited")
	}
	remove()
	if v := cm.route(own, "10.0.0.2:5000", now); v.known {
		t.Fatal("key still known after the session ended")
	}
}

// TestCancelKeyReuse: removing an ended session's key leaves a later
// session's registration of the same key (a reused PID and secret) alone.
func TestCancelKeyReuse(t *testing.T) {
	var cm cancelMap
	key := &pgproto3.BackendKeyData{ProcessID: 9, SecretKey: []byte{9, 9, 9, 9}}
	removeOld := cm.add(key, 1)
	removeNew := cm.add(key, 2)
	removeOld()
	removeOld()
	if v := cm.route(&pgproto3.CancelRequest{ProcessID: 9, SecretKey: []byte{9, 9, 9, 9}}, "unix", time.Now()); !v.known || v.conn != 2 {
		t.Fatalf("later session's key lost: %+v", v)
	}
	removeNew()
	if cm.registered() != 0 {
		t.Fatalf("%d keys left", cm.registered())
	}
	// A session without a key (a database that sent none) registers nothing.
	cm.add(nil, 3)()
}

// TestCancelLimiterBounded: a flood from many source addresses cannot grow
// the table past its bound; beyond it new sources share the overflow
// bucket; idle buckets are forgotten.
func TestCancelLimiterBounded(t *testing.T) {
	l := cancelLimiter{max: 100}
	now := time.Unix(1000, 0)
	for i := 0; i < 100; i++ {
		if !l.allow(fmt.Sprintf("src%d", i), now) {
			t.Fatalf("source %d refused its first request", i)
		}
	}
	allowed := 0
	for i := 100; i < 10000; i++ {
		if l.allow(fmt.Sprintf("src%d", i), now) {
			allowed++
		}
	}
	if len(l.buckets) > 100 {
		t.Fatalf("table grew to %d", len(l.buckets))
	}
	if allowed != int(unknownCancelBurst) {
		t.Fatalf("overflow forwarded %d, want one burst (%v)", allowed, unknownCancelBurst)
	}
	// Once the old buckets are full again they are forgotten, and a new
	// source gets a bucket of its own.
	now = now.Add(time.Minute)
	if !l.allow("fresh", now) {
		t.Fatal("fresh source refused after the table went idle")
	}
	if _, ok := l.buckets["fresh"]; !ok || len(l.buckets) != 1 {
		t.Fatalf("idle buckets not swept: %d left", len(l.buckets))
	}
}

func TestSourceKey(t *testing.T) {
	same := [][2]string{
		{"192.0.2.1:1000", "192.0.2.1:2000"},
		{"[2001:db8:1:2::1]:1000", "[2001:db8:1:2:ffff::9]:2000"}, // one /64
		{"unix", ""},
		{"[::ffff:192.0.2.1]:5", "192.0.2.1:6"},
	}
	for _, p := range same {
		if sourceKey(p[0]) != sourceKey(p[1]) {
			t.Errorf("%s and %s should share a bucket", p[0], p[1])
		}
	}
	differ := [][2]string{
		{"192.0.2.1:1000", "192.0.2.2:1000"},
		{"[2001:db8:1:2::1]:1000", "[2001:db8:1:3::1]:1000"},
		{"192.0.2.1:1000", "unix"},
	}
	for _, p := range differ {
		if sourceKey(p[0]) == sourceKey(p[1]) {
			t.Errorf("%s and %s should not share a bucket", p[0], p[1])
		}
	}
}

// registered reports how many keys are registered.
func (cm *cancelMap) registered() int {
	cm.mu.Lock()
	defer cm.mu.Unlock()
	return len(cm.m)
}
