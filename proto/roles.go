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
	// does not reveal that a user does not exist. Set once, from the first
	// login's Rand.
	mockOnce sync.Once
	mockKey  []byte
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

// mockSalt returns a per-user salt for users that do not exist, the same on
// every attempt.
func (r *Roles) mockSalt(user string, rand io.Reader) []byte {
	r.mockOnce.Do(func() {
		k := make([]byte, 32)
		if rand != nil {
			io.ReadFull(rand, k) // a short read leaves zeros: still a valid (weaker) key
		}
		r.mockKey = k
	})
	m := hmac.New(sha256.New, r.mockKey)
	m.Write([]byte(user))
	return m.Sum(nil)[:16]
}
