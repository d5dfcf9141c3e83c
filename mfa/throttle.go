package mfa

import "time"

// failures counts recent failures per key in a sliding window. Only the last
// max timestamps of a key matter for the decision, so no more are kept: the
// memory per key is bounded whatever an attacker sends.
type failures struct {
	max    int // <= 0: no limit
	window time.Duration
	m      map[string][]time.Time
}

func newFailures(max int, window time.Duration) *failures {
	return &failures{max: max, window: window, m: map[string][]time.Time{}}
}

// recent drops the timestamps that left the window and returns the rest.
func (f *failures) recent(key string, now time.Time) []time.Time {
	ts := f.m[key]
	i := 0
	for i < len(ts) && !now.Before(ts[i].Add(f.window)) {
		i++
	}
	if i == len(ts) {
		delete(f.m, key)
		return nil
	}
	if i > 0 {
		ts = append(ts[:0], ts[i:]...)
		f.m[key] = ts
	}
	return ts
}

// blockedUntil reports whether key has used its budget, and when the oldest
// counted failure leaves the window.
func (f *failures) blockedUntil(key string, now time.Time) (time.Time, bool) {
	if f.max <= 0 {
		return time.Time{}, false
	}
	ts := f.recent(key, now)
	if len(ts) < f.max {
		return time.Time{}, false
	}
	return ts[len(ts)-f.max].Add(f.window), true
}

// add counts one failure at now.
func (f *failures) add(key string, now time.Time) {
	if f.max <= 0 {
		return
	}
	ts := append(f.recent(key, now), now)
	if len(ts) > f.max {
		ts = append(ts[:0], ts[len(ts)-f.max:]...)
	}
	f.m[key] = ts
}

// set replaces key's failures with ts (oldest first; the Shared store's
// count), keeping the last max.
func (f *failures) set(key string, ts []time.Time) {
	if f.max <= 0 || len(ts) == 0 {
		delete(f.m, key)
		return
	}
	if len(ts) > f.max {
		ts = ts[len(ts)-f.max:]
	}
	f.m[key] = append([]time.Time(nil), ts...)
}

// reset forgets key's failures.
func (f *failures) reset(key string) { delete(f.m, key) }

// sweep drops every key whose failures all left the window.
func (f *failures) sweep(now time.Time) {
	for k := range f.m {
		f.recent(k, now)
	}
}
