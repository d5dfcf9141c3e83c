package proto

import (
	"crypto/hmac"
	"crypto/sha256"
	"io"
	"sync"
)

// Roles is the registry of users the proxy authenticates itself (the
// scram-sha-256, md5 and password methods), keyed by user name. It is safe
// for concurrent use and can change while the proxy runs: a login uses the
// verifier it looked up when it started.
type Roles struct {
	mu    sync.RWMutex
	roles map[string]*Verifier

	// mockKey makes the dummy SCRAM salt of an unknown user stable across
	// attempts (like PostgreSQL's mock_auth_nonce), so that a changing salt
	// does not reveal that a user does not exist. Set by SetMock, or else
	// from the first dummy exchange's Rand (which a later SetMock replaces,
	// once: the server secret is what a restart would use).
	mockMu     sync.Mutex
	mockKey    []byte
	mockSecret bool // mockKey came from SetMock
	// mockIter is the iteration count of an unknown user's dummy exchange;
	// it must be the count real verifiers are made with, or the exchange
	// tells unknown users apart (SetMock).
	mockIter int
}

// NewRoles returns an empty registry.
func NewRoles() *Roles { return &Roles{roles: make(map[string]*Verifier)} }

// Set adds or replaces a user's verifier (see ParseVerifier for formats).
func (r *Roles) Set(user, verifier string) error {
	v, err := ParseVerifier(verifier)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.roles[user] = v
	r.mu.Unlock()
	return nil
}

// Remove deletes a user; later logins as that user fail like unknown users.
func (r *Roles) Remove(user string) {
	r.mu.Lock()
	delete(r.roles, user)
	r.mu.Unlock()
}

// Lookup returns the user's verifier. Verifiers are immutable once parsed.
func (r *Roles) Lookup(user string) (*Verifier, bool) {
	if r == nil {
		return nil, false
	}
	r.mu.RLock()
	v, ok := r.roles[user]
	r.mu.RUnlock()
	return v, ok
}

// SetMock fixes the key behind unknown users' dummy salts (a server secret
// kept across restarts, as PostgreSQL keeps mock_auth_nonce in pg_control,
// so that a restart does not change them while real salts stay) and the
// iteration count of their dummy exchange (the count new verifiers get).
// The first call's key stays (it replaces a key a dummy exchange made up
// before it); the count follows the latest call.
func (r *Roles) SetMock(key []byte, iterations int) {
	r.mockMu.Lock()
	if !r.mockSecret && len(key) > 0 {
		r.mockKey, r.mockSecret = append([]byte(nil), key...), true
	}
	r.mockMu.Unlock()
	if iterations > 0 {
		r.mu.Lock()
		r.mockIter = iterations
		r.mu.Unlock()
	}
}

// mockIterations is the iteration count of a dummy exchange.
func (r *Roles) mockIterations() int {
	if r == nil {
		return 4096
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.mockIter == 0 {
		return 4096
	}
	return r.mockIter
}

// mockSalt returns a per-user salt for users that do not exist, the same on
// every attempt.
func (r *Roles) mockSalt(user string, rand io.Reader) []byte {
	r.mockMu.Lock()
	if r.mockKey == nil {
		k := make([]byte, 32)
		if rand != nil {
			io.ReadFull(rand, k) // a short read leaves zeros: still a valid (weaker) key
		}
		r.mockKey = k
	}
	key := r.mockKey
	r.mockMu.Unlock()
	m := hmac.New(sha256.New, key)
	m.Write([]byte(user))
	return m.Sum(nil)[:16]
}
