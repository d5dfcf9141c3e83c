package mfa

import (
	"errors"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// storeCalls records what Options.OnStoreCall is told.
type storeCalls []string

func (s *storeCalls) observe(op string, took time.Duration, err error) {
	e := "ok"
	if err != nil {
		e = "error"
	}
	if took < 0 {
		e = "negative duration"
	}
	*s = append(*s, op+" "+e)
}

// OnStoreCall is told of each store call with I/O a Guard makes, with its
// outcome; answers like "re-enrolled" are not store failures; checks that
// need no store call report none.
func TestOnStoreCall(t *testing.T) {
	var calls storeCalls
	fc := failingClaimer{accounts{"alice": {Secret: secretA}}}
	g := NewGuard(Options{Now: func() time.Time { return t0 }, OnStoreCall: calls.observe}, fc)
	g.Verify("alice", "192.0.2.1:1", code(t, g, "alice", t0))
	g.Verify("alice", "192.0.2.1:1", otherCode(t, g, "alice", t0)) // refused before any claim
	g.Verify("nobody", "192.0.2.1:1", "123456")
	if want := []string{StoreOpClaimStep + " error"}; !reflect.DeepEqual([]string(calls), want) {
		t.Fatalf("failing store: %q, want %q", calls, want)
	}

	calls = nil
	path := filepath.Join(t.TempDir(), "totp.json")
	mine, _ := OpenFileStore(path)
	if _, err := mine.Enroll("alice", EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	g = NewGuard(Options{Now: func() time.Time { return t0 }, OnStoreCall: calls.observe}, mine)
	old := code(t, g, "alice", t0)
	other, _ := OpenFileStore(path)
	if _, err := other.Enroll("alice", EnrollOptions{}, true); err != nil {
		t.Fatal(err)
	}
	if o := g.Verify("alice", "192.0.2.1:1", old); o.OK {
		t.Fatal("the old secret's code was accepted")
	}
	fresh, _ := other.Code("alice", t0)
	if o := g.Verify("alice", "192.0.2.1:1", fresh); !o.OK {
		t.Fatalf("fresh code: %+v", o)
	}
	if want := []string{StoreOpClaimStep + " ok", StoreOpClaimStep + " ok"}; !reflect.DeepEqual([]string(calls), want) {
		t.Fatalf("file store: %q, want %q", calls, want)
	}
}

// fleetStore is a Shared AccountLoader in memory whose calls all fail
// while down is set: the shape of the PostgreSQL store.
type fleetStore struct {
	accounts
	down  bool
	steps map[string]int64
	fails map[string][]time.Time
}

var errDown = errors.New("store unreachable")

func (s *fleetStore) err() error {
	if s.down {
		return errDown
	}
	return nil
}

func (s *fleetStore) LoadAccount(user string) (Account, bool, error) {
	a, ok := s.accounts[user]
	return a, ok, s.err()
}
func (s *fleetStore) ClaimStep(user string, step int64, secret string) (bool, error) {
	return s.ClaimStepGrant(user, step, secret, "", Grant{})
}
func (s *fleetStore) ClaimStepGrant(user string, step int64, _ string, _ string, _ Grant) (bool, error) {
	if s.down {
		return false, errDown
	}
	if s.steps[user] >= step {
		return false, nil
	}
	s.steps[user] = step
	return true, nil
}
func (s *fleetStore) Failures(keys []string, _ time.Time) (map[string][]time.Time, error) {
	m := map[string][]time.Time{}
	for _, k := range keys {
		m[k] = s.fails[k]
	}
	return m, s.err()
}
func (s *fleetStore) AddFailure(keys []string, at time.Time) error {
	for _, k := range keys {
		s.fails[k] = append(s.fails[k], at)
	}
	return s.err()
}
func (s *fleetStore) ResetFailures(key string) error { delete(s.fails, key); return s.err() }
func (s *fleetStore) Grant(string, time.Time) (Grant, bool, error) {
	return Grant{}, false, s.err()
}
func (s *fleetStore) PutGrant(string, Grant) error { return s.err() }

// With a fleet store every round trip of a login is reported, and an
// unreachable store's are reported as errors.
func TestOnStoreCallShared(t *testing.T) {
	var calls storeCalls
	st := &fleetStore{accounts: accounts{"alice": {Secret: secretA}}, steps: map[string]int64{}, fails: map[string][]time.Time{}}
	g := NewGuard(Options{Now: func() time.Time { return t0 }, Remember: time.Minute, OnStoreCall: calls.observe}, st)
	bad := otherCode(t, g, "alice", t0)
	calls = nil
	if o := g.Verify("alice", "192.0.2.1:1", bad); o.Reason != ReasonBadCode {
		t.Fatalf("bad code: %+v", o)
	}
	if o := g.Verify("alice", "192.0.2.1:1", code(t, g, "alice", t0)); !o.OK {
		t.Fatalf("good code: %+v", o)
	}
	// code() itself loaded the account once (the line before the
	// Verify); it is a store call like any other.
	want := []string{
		"failures ok", "grant ok", "load_account ok", "add_failure ok", // the bad code
		"load_account ok",                                                                  // code()
		"failures ok", "grant ok", "load_account ok", "claim_step ok", "reset_failures ok", // the good one
	}
	if !reflect.DeepEqual([]string(calls), want) {
		t.Fatalf("calls:\n%q\nwant\n%q", calls, want)
	}
	calls = nil
	st.down = true
	if o := g.Verify("alice", "192.0.2.1:1", bad); o.Reason != ReasonStoreDown {
		t.Fatalf("store down: %+v", o)
	}
	if want := []string{"failures error"}; !reflect.DeepEqual([]string(calls), want) {
		t.Fatalf("store down: %q, want %q", calls, want)
	}
}
