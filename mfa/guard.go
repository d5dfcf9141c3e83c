package mfa

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
)

// sweepEvery is how many Verify calls pass between sweeps of expired
// throttle and remember entries; it bounds their memory to what one window
// of traffic can create.
const sweepEvery = 1024

// Guard verifies codes: TOTP check with skew, single use per time step per
// user (RFC 6238 §5.2: the last accepted step per user is remembered and any
// step at or before it is refused), throttling per user and per client
// address (after too many failures, further attempts are refused without
// checking the code, with a message saying when to retry), and the optional
// remember window. Safe for concurrent use from many goroutines.
//
// Single use: when the Secrets are a StepClaimer (FileStore), accepting a
// code is one compare-and-set against the store, so every Guard sharing the
// store — other processes too — accepts a step at most once, and a restart
// does not reopen a used code. That call does I/O: Verify must not run on an
// event loop. With other Secrets single use holds within this Guard only.
//
// Approvals (Approvals.Approve) verify the code on behalf of an approver:
// their failures are charged to the approver's own budget, never to the
// user's or an address's, so bad approvals cannot lock a user out.
//
// Throttling and remember state is in memory, per process, unless the
// store is Shared (the PostgreSQL store): then it is read from and written
// to the store around every decision, and a fleet of proxies sharing the
// store throttles and remembers as one.
type Guard struct {
	opts    Options
	secrets Secrets
	shared  Shared        // nil: throttling and remember are per process
	loader  AccountLoader // nil: lookups cannot fail

	mu         sync.Mutex
	used       map[string]int64         // user → unix second at which its last accepted step began
	claiming   map[string]chan struct{} // user → closed when this Guard's claim in flight for the user settles
	byUser     *failures
	byAddr     *failures
	byApprover *failures
	remember   map[string]remembered
	calls      int
}

// remembered is a success that lets the same user from the same IP in
// without a code until until.
type remembered struct {
	until     time.Time
	stepStart int64  // the accepted step, for the pool rule
	tag       string // SecretTag of the secret it was proved with: rotating the secret ends the window
}

// NewGuard returns a Guard over secrets. It panics if opts do not pass
// Options.Validate: the MFA policy is not something to guess about.
func NewGuard(opts Options, secrets Secrets) *Guard {
	if err := opts.Validate(); err != nil {
		panic("mfa.NewGuard: " + err.Error())
	}
	o := opts.withDefaults()
	shared, _ := secrets.(Shared)
	loader, _ := secrets.(AccountLoader)
	return &Guard{
		opts:       o,
		secrets:    secrets,
		shared:     shared,
		loader:     loader,
		used:       map[string]int64{},
		claiming:   map[string]chan struct{}{},
		byUser:     newFailures(o.MaxFailures, o.FailureWindow),
		byAddr:     newFailures(o.MaxAddrFailures, o.FailureWindow),
		byApprover: newFailures(o.MaxFailures, o.FailureWindow),
		remember:   map[string]remembered{},
	}
}

// InMemory reports whether Remembered and CheckEnrolled answer from
// memory (a store without network I/O, like FileStore), so an event loop
// may call them itself. With a Shared store or an AccountLoader (the
// PostgreSQL store) they do store I/O and belong on a goroutine.
func (g *Guard) InMemory() bool { return g.shared == nil && g.loader == nil }

// Options returns the options in effect, defaults filled in.
func (g *Guard) Options() Options { return g.opts }

// Enrolled reports whether user has a secret (false when the store cannot
// say: see CheckEnrolled).
func (g *Guard) Enrolled(user string) bool {
	_, ok, err := g.account(user)
	return ok && err == nil
}

// CheckEnrolled is Enrolled as an outcome: OK, NotEnrolled, or the store's
// outage (ReasonStoreDown), so a login is never told "not enrolled" because
// the store is unreachable. It may do store I/O.
func (g *Guard) CheckEnrolled(user string) Outcome {
	_, ok, err := g.account(user)
	switch {
	case err != nil:
		g.storeError(user, err)
		return storeDown(user)
	case !ok:
		return NotEnrolled(user)
	}
	return Outcome{OK: true}
}

// account looks user up in the store, through the AccountLoader when the
// store has one.
func (g *Guard) account(user string) (Account, bool, error) {
	if g.loader != nil {
		t := g.timer()
		a, ok, err := g.loader.LoadAccount(user)
		g.storeCall(StoreOpLoadAccount, t, err)
		return a, ok, err
	}
	a, ok := account(g.secrets, user)
	return a, ok, nil
}

// timer starts timing a store call for Options.OnStoreCall (the zero time
// when nobody listens: no clock read on the login path then).
func (g *Guard) timer() time.Time {
	if g.opts.OnStoreCall == nil {
		return time.Time{}
	}
	return time.Now()
}

// storeCall reports a store call timed from start to Options.OnStoreCall.
// "Not enrolled" and "re-enrolled" are answers, not failures of the store.
func (g *Guard) storeCall(op string, start time.Time, err error) {
	if g.opts.OnStoreCall == nil {
		return
	}
	if errors.Is(err, ErrNotEnrolled) || errors.Is(err, ErrSecretChanged) {
		err = nil
	}
	g.opts.OnStoreCall(op, time.Since(start), err)
}

func (g *Guard) storeError(user string, err error) {
	if g.opts.OnStoreError != nil {
		g.opts.OnStoreError(user, err)
	}
}

// Verify checks a code for user connecting from addr ("ip:port" or a unix
// path; throttling and remember key on the IP or the path). With a
// StepClaimer store it does the store's I/O: call it off event loops.
//
// When Remember > 0, a login presenting the same code that was just accepted
// for the same user from the same address passes (a pool opening many
// connections with one code); otherwise a second use is a replay.
//
// Failures that count against the budgets: a wrong or malformed code, and a
// code for a user with no secret (per address only). A replay does not
// count: it is not a guess, and a pool without --mfa-remember would lock its
// own user out. A throttled attempt does not count either.
func (g *Guard) Verify(user, addr, code string) Outcome {
	return g.verify(attempt{user: user, addr: addr, code: code})
}

// VerifyPage is Verify for a sign-in on the approval page (loop/web) from
// addr: the same throttles, budgets and single use, but no remember
// window is opened or honoured (a code spent on the page is spent, and the
// browser's address gains nothing for database logins).
func (g *Guard) VerifyPage(user, addr, code string) Outcome {
	return g.verify(attempt{user: user, addr: addr, code: code, page: true})
}

// attempt is one code to verify.
type attempt struct {
	user, addr, code string
	// approver is set for an approval (who approves): the attempt is
	// throttled by, and its failures charged to, the approver's budget
	// alone, and it is no client: nothing is remembered for it and the pool
	// rule does not apply (a spent code must not approve twice).
	approver string
	// page is a sign-in on the approval page (loop/web): throttled and
	// charged like a client (the user's and the address's budgets) and
	// single use like any code, but it opens no remember window — the
	// browser's address is not a database client's.
	page bool
}

func (a attempt) client() bool { return a.approver == "" }

// remembers reports whether a success of a opens (or the pool rule of a
// reads) a remember window: a database client's only.
func (a attempt) remembers() bool { return a.client() && !a.page }

// checked is check's verdict: a final outcome, a claim to make, or a claim
// of this Guard's to wait for.
type checked struct {
	o       Outcome
	wait    <-chan struct{} // this Guard is claiming a step of the user: wait, then check again
	claim   []int64         // the code's steps after the last accepted one, oldest first: claim one
	steps   []int64         // every step the code matches (pool rule)
	acct    Account
	p       params
	claimer StepClaimer
	done    chan struct{} // closed by settle
	charge  []string      // Shared failure keys charged by this check
	now     time.Time
}

func (g *Guard) verify(a attempt) Outcome {
	a.code = strings.TrimSpace(a.code)
	for {
		if g.shared != nil {
			if err := g.preload(a); err != nil {
				g.storeError(a.user, err)
				return storeDown(a.user)
			}
		}
		c := g.check(a)
		if len(c.charge) > 0 {
			// The refusal stands either way; a count that could not be
			// written is logged.
			t := g.timer()
			err := g.shared.AddFailure(c.charge, c.now)
			g.storeCall(StoreOpAddFailure, t, err)
			if err != nil {
				g.storeError(a.user, err)
			}
		}
		if c.wait != nil {
			<-c.wait
			continue
		}
		if c.claim == nil {
			return c.o
		}
		return g.settle(a, c)
	}
}

// check is the part of verify under the lock: throttles, the code, the
// steps already used. With a StepClaimer it does not decide a fresh step
// itself but returns it to be claimed (outside the lock: the claim is I/O).
func (g *Guard) check(a attempt) (c checked) {
	acct, enrolled, err := g.account(a.user)
	if err != nil {
		g.storeError(a.user, err)
		return checked{o: storeDown(a.user)}
	}
	claimer, _ := g.secrets.(StepClaimer)

	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.opts.Now()
	g.maybeSweep(now)
	if g.shared != nil {
		// Whatever this check charges goes to the store too (after the
		// lock: it is I/O).
		defer func() {
			c.charge = g.charged(a, c.o)
			c.now = now
		}()
	}

	if a.client() {
		if until, blocked := g.byUser.blockedUntil(a.user, now); blocked {
			return checked{o: throttled(a.user, true, until, now)}
		}
		if until, blocked := g.byAddr.blockedUntil(throttleKey(a.addr), now); blocked {
			return checked{o: throttled(a.user, false, until, now)}
		}
	} else if until, blocked := g.byApprover.blockedUntil(a.approver, now); blocked {
		return checked{o: approverThrottled(until, now)}
	}
	if !enrolled {
		if a.client() {
			g.byAddr.add(throttleKey(a.addr), now)
		} else {
			g.byApprover.add(a.approver, now)
		}
		return checked{o: NotEnrolled(a.user)}
	}
	p, err := resolve(acct, g.opts)
	if err != nil {
		return checked{o: badAccount(a.user)}
	}
	if !wellFormed(a.code, p) {
		g.fail(a, now)
		return checked{o: malformed(a.user, p)}
	}
	steps, err := matchingSteps(acct.Secret, a.code, now, uint(max(g.opts.Skew, 0)), p)
	if err != nil {
		return checked{o: badAccount(a.user)}
	}
	if len(steps) == 0 {
		g.fail(a, now)
		return checked{o: badCode(a.user, p)}
	}
	if ch, busy := g.claiming[a.user]; busy {
		return checked{wait: ch}
	}
	last, seen := g.used[a.user]
	if acct.LastStep > last {
		// Accepted by another process, or before a restart (the store keeps it).
		last, seen = acct.LastStep, true
	}
	var fresh []int64
	for _, s := range steps {
		if start := s * p.period; !seen || start > last {
			fresh = append(fresh, start)
		}
	}
	starts := make([]int64, len(steps))
	for i, s := range steps {
		starts[i] = s * p.period
	}
	if len(fresh) == 0 {
		return checked{o: g.usedLocked(a, acct, starts, now, p)}
	}
	if claimer == nil {
		g.acceptLocked(a, acct, fresh[0], now)
		return checked{o: ok}
	}
	done := make(chan struct{})
	g.claiming[a.user] = done
	return checked{claim: fresh, steps: starts, acct: acct, p: p, claimer: claimer, done: done}
}

// settle claims one of c.claim in the store and records the result.
func (g *Guard) settle(a attempt, c checked) Outcome {
	var accepted int64
	var err error
	grantKey := ""
	if g.shared != nil && a.remembers() && g.opts.Remember > 0 {
		grantKey = rememberKey(a.user, a.addr)
	}
	// The store's failures of the user were just loaded (preload): reset
	// them in the store only if there are any (a round trip saved per login).
	g.mu.Lock()
	hadFailures := len(g.byUser.m[a.user]) > 0
	g.mu.Unlock()
	for _, start := range c.claim {
		var claimed bool
		t := g.timer()
		if g.shared != nil {
			claimed, err = g.shared.ClaimStepGrant(a.user, start, c.acct.Secret, grantKey,
				Grant{Until: g.opts.Now().Add(g.opts.Remember), StepStart: start, SecretTag: SecretTag(c.acct.Secret)})
		} else {
			claimed, err = c.claimer.ClaimStep(a.user, start, c.acct.Secret)
		}
		g.storeCall(StoreOpClaimStep, t, err)
		if err != nil || claimed {
			if claimed {
				accepted = start
			}
			break
		}
	}
	if err != nil && !errors.Is(err, ErrNotEnrolled) && !errors.Is(err, ErrSecretChanged) {
		g.storeError(a.user, err)
	}
	if g.shared != nil && err == nil {
		if accepted != 0 && hadFailures {
			t := g.timer()
			rerr := g.shared.ResetFailures(userKey(a.user))
			g.storeCall(StoreOpResetFailures, t, rerr)
			if rerr != nil {
				g.storeError(a.user, rerr)
			}
		} else if grantKey != "" {
			// Lost the claim: the winner's grant, written with its claim,
			// decides the pool rule.
			if rerr := g.loadGrant(a); rerr != nil {
				g.storeError(a.user, rerr)
			}
		}
	}

	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.claiming, a.user)
	close(c.done)
	now := g.opts.Now()
	switch {
	case errors.Is(err, ErrNotEnrolled):
		// Removed from the store since it was loaded here.
		return NotEnrolled(a.user)
	case errors.Is(err, ErrSecretChanged):
		// Re-enrolled: the code is of the old secret. Not charged: the
		// store has adopted the new secret, so this cannot repeat.
		return badCode(a.user, c.p)
	case err != nil:
		return storeFailed(a.user)
	case accepted != 0:
		g.acceptLocked(a, c.acct, accepted, now)
		return ok
	}
	// Every step was taken already (by another process): a replay.
	if last := c.claim[len(c.claim)-1]; last > g.used[a.user] {
		g.used[a.user] = last
	}
	return g.usedLocked(a, c.acct, c.steps, now, c.p)
}

// acceptLocked records an accepted step.
func (g *Guard) acceptLocked(a attempt, acct Account, start int64, now time.Time) {
	if start > g.used[a.user] {
		g.used[a.user] = start
	}
	// The user proved possession: forgive their failures (the address's
	// budget stays spent).
	g.byUser.reset(a.user)
	if a.remembers() {
		g.rememberLocked(a.user, a.addr, acct.Secret, start, now)
	}
}

// usedLocked is the answer to a valid code whose steps were all used: the
// pool rule (Remember) or a replay.
func (g *Guard) usedLocked(a attempt, acct Account, starts []int64, now time.Time, p params) Outcome {
	if a.remembers() && g.opts.Remember > 0 {
		if r, hit := g.remember[rememberKey(a.user, a.addr)]; hit && now.Before(r.until) && r.tag == SecretTag(acct.Secret) {
			for _, s := range starts {
				if s == r.stepStart {
					return Outcome{OK: true, Reason: ReasonRemembered}
				}
			}
		}
	}
	return replayed(a.user, p)
}

// Remembered reports whether user@addr passes without a code now (Remember
// window). It refreshes nothing: the window runs from the last code.
func (g *Guard) Remembered(user, addr string) bool {
	if g.opts.Remember <= 0 {
		return false
	}
	acct, enrolled, err := g.account(user)
	if err != nil || !enrolled {
		// A store that cannot answer remembers nobody: the login then
		// needs a code, and fails closed on the same store.
		return false
	}
	if g.shared != nil {
		if err := g.loadGrant(attempt{user: user, addr: addr}); err != nil {
			g.storeError(user, err)
			return false
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	r, hit := g.remember[rememberKey(user, addr)]
	return hit && g.opts.Now().Before(r.until) && r.tag == SecretTag(acct.Secret)
}

func (g *Guard) rememberLocked(user, addr, secret string, stepStart int64, now time.Time) {
	if g.opts.Remember > 0 {
		g.remember[rememberKey(user, addr)] = remembered{until: now.Add(g.opts.Remember), stepStart: stepStart, tag: SecretTag(secret)}
	}
}

// rememberApproved opens the remember window for a login released by an
// approval: the approver proved the code, the login came from addr.
func (g *Guard) rememberApproved(user, addr string) {
	if g.opts.Remember <= 0 {
		return
	}
	acct, enrolled, err := g.account(user)
	if err != nil || !enrolled {
		return
	}
	now := g.opts.Now()
	if g.shared != nil {
		gr := Grant{Until: now.Add(g.opts.Remember), StepStart: -1, SecretTag: SecretTag(acct.Secret)}
		t := g.timer()
		err := g.shared.PutGrant(rememberKey(user, addr), gr)
		g.storeCall(StoreOpPutGrant, t, err)
		if err != nil {
			g.storeError(user, err)
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.rememberLocked(user, addr, acct.Secret, -1, now)
}

// fail charges a wrong code: to the user and the address, or to the
// approver alone.
func (g *Guard) fail(a attempt, now time.Time) {
	if !a.client() {
		g.byApprover.add(a.approver, now)
		return
	}
	g.byUser.add(a.user, now)
	g.byAddr.add(throttleKey(a.addr), now)
}

func (g *Guard) maybeSweep(now time.Time) {
	g.calls++
	if g.calls%sweepEvery != 0 {
		return
	}
	g.byUser.sweep(now)
	g.byAddr.sweep(now)
	g.byApprover.sweep(now)
	for k, r := range g.remember {
		if !now.Before(r.until) {
			delete(g.remember, k)
		}
	}
}

// Code returns the code of user's secret at t; for tests, demos and `pgmfa
// code`, never for verification.
func (g *Guard) Code(user string, t time.Time) (string, error) {
	acct, enrolled, err := g.account(user)
	if err != nil {
		return "", err
	}
	if !enrolled {
		return "", fmt.Errorf("user %q is not enrolled", user)
	}
	return accountCode(acct, g.opts, t)
}

func accountCode(acct Account, defaults Options, t time.Time) (string, error) {
	p, err := resolve(acct, defaults)
	if err != nil {
		return "", err
	}
	return codeAt(acct.Secret, p.stepAt(t), p)
}

// preload copies the Shared store's state for a's decision into this
// Guard's memory: the failures of the user and the address (or of the
// approver) and, for a client with Remember on, its grant. The store is the
// truth; what this Guard counted itself is already in it.
func (g *Guard) preload(a attempt) error {
	now := g.opts.Now()
	var keys []string
	if a.client() {
		keys = []string{userKey(a.user), addrKey(a.addr)}
	} else {
		keys = []string{approverKey(a.approver)}
	}
	t := g.timer()
	got, err := g.shared.Failures(keys, now.Add(-g.opts.FailureWindow))
	g.storeCall(StoreOpFailures, t, err)
	if err != nil {
		return err
	}
	g.mu.Lock()
	if a.client() {
		g.byUser.set(a.user, got[keys[0]])
		g.byAddr.set(throttleKey(a.addr), got[keys[1]])
	} else {
		g.byApprover.set(a.approver, got[keys[0]])
	}
	g.mu.Unlock()
	if a.remembers() && g.opts.Remember > 0 {
		return g.loadGrant(a)
	}
	return nil
}

// loadGrant replaces this Guard's remember entry for a's user and address
// with the Shared store's.
func (g *Guard) loadGrant(a attempt) error {
	key := rememberKey(a.user, a.addr)
	t := g.timer()
	gr, ok, err := g.shared.Grant(key, g.opts.Now())
	g.storeCall(StoreOpGrant, t, err)
	if err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if ok {
		g.remember[key] = remembered{until: gr.Until, stepStart: gr.StepStart, tag: gr.SecretTag}
	} else {
		delete(g.remember, key)
	}
	return nil
}

// charged is the Shared failure keys a check's outcome charged (see fail
// and the not-enrolled branch of check).
func (g *Guard) charged(a attempt, o Outcome) []string {
	switch o.Reason {
	case ReasonBadCode, ReasonMalformed:
		if !a.client() {
			return []string{approverKey(a.approver)}
		}
		return []string{userKey(a.user), addrKey(a.addr)}
	case ReasonNotEnrolled:
		if !a.client() {
			return []string{approverKey(a.approver)}
		}
		return []string{addrKey(a.addr)}
	}
	return nil
}
