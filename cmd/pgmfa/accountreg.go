package main

import (
	"fmt"
	"log/slog"
	"sync"

	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

// accountRegistry is what `serve --auth accounts` logs clients in against:
// the accounts of the store, held in memory (the login machine does no
// I/O), loaded at start and on SIGHUP. It implements session.Accounts.
type accountRegistry struct {
	roles *proto.Roles

	mu sync.RWMutex
	up map[string][2]string // account → database role, password
}

func newAccountRegistry() *accountRegistry {
	return &accountRegistry{roles: proto.NewRoles(), up: map[string][2]string{}}
}

// Roles implements session.Accounts.
func (r *accountRegistry) Roles() *proto.Roles { return r.roles }

// Upstream implements session.Accounts.
func (r *accountRegistry) Upstream(account string) (role, password string, ok bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	u, ok := r.up[account]
	return u[0], u[1], ok
}

// load replaces the registry's content with the store's and returns how
// many accounts it holds. A store with an unreadable verifier is refused
// as a whole (the old content stays): a half-loaded registry would refuse
// some people for no reason they could see.
//
// Unknown accounts get a dummy SCRAM exchange with the salt the store's
// secret derives and the iteration count most real verifiers have, so
// that neither tells them apart.
func (r *accountRegistry) load(s accountStore) (int, error) {
	names, err := s.ListAccounts()
	if err != nil {
		return 0, err
	}
	verifiers := make(map[string]*proto.Verifier, len(names))
	up := make(map[string][2]string, len(names))
	counts := map[int]int{}
	for _, n := range names {
		a, ok, err := s.GetAccount(n)
		if err != nil {
			return 0, err
		}
		if !ok {
			continue
		}
		v, err := proto.ParseVerifier(a.Verifier)
		if err != nil {
			return 0, fmt.Errorf("account %q: %w", n, err)
		}
		verifiers[n] = v
		up[n] = [2]string{a.Role, a.DBPassword}
		if v.IsSCRAM() {
			counts[v.Iterations()]++
		}
	}
	iter, most := defaultSCRAMIterations, 0
	for it, c := range counts {
		if c > most || (c == most && it < iter) {
			iter, most = it, c
		}
	}
	secret, err := s.AccountsSecret()
	if err != nil {
		return 0, err
	}
	if len(secret) > 0 {
		r.roles.SetMock(secret, iter)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for n := range r.up {
		if _, ok := up[n]; !ok {
			r.roles.Remove(n)
		}
	}
	for n, v := range verifiers {
		if err := r.roles.Set(n, v.String()); err != nil {
			return 0, err
		}
	}
	r.up = up
	return len(up), nil
}

// loadAccounts builds the registry of --auth accounts (nil for the other
// modes).
func (f *serveFlags) loadAccounts(auth session.Auth, store mfaStore, logger *slog.Logger) (*accountRegistry, error) {
	if auth != session.AuthAccounts {
		return nil, nil
	}
	as, err := accountsOf(store)
	if err != nil {
		return nil, fmt.Errorf("--auth accounts: %w", err)
	}
	reg := newAccountRegistry()
	n, err := reg.load(as)
	if err != nil {
		return nil, fmt.Errorf("--auth accounts: %w", err)
	}
	if n == 0 {
		logger.Warn("the store has no accounts; logins will be refused until `pgmfa account add USER` (then SIGHUP)", "store", store.String())
	}
	if f.accountMethod == proto.MethodPassword && f.tls.cert == "" && !f.allowCleartext {
		logger.Warn("--account-method password without client TLS: every login will be refused (give --tls-cert, or --allow-cleartext-password on a loopback-only setup)")
	}
	return reg, nil
}

// reloadAccounts re-reads the accounts after the store was reloaded
// (SIGHUP); on error the old ones stay.
func reloadAccounts(reg *accountRegistry, store mfaStore, logger *slog.Logger) {
	as, err := accountsOf(store)
	if err == nil {
		var n int
		if n, err = reg.load(as); err == nil {
			logger.Info("accounts reloaded", "accounts", n)
			return
		}
	}
	logger.Error("reload of the accounts failed; keeping the old ones", "err", err)
}
