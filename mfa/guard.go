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
// Throttling and remember state is in memory, per process.
type Guard struct {
	opts    Options
	secrets Secrets

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
	secret    string // the secret it was proved with: rotating the secret ends the window
}

// NewGuard returns a Guard over secrets. It panics if opts do not pass
// Options.Validate: the MFA policy is not something to guess about.
func NewGuard(opts Options, secrets Secrets) *Guard {
	if err := opts.Validate(); err != nil {
		panic("mfa.NewGuard: " + err.Error())
	}
	o := opts.withDefaults()
	return &Guard{
		opts:       o,
		secrets:    secrets,
		used:       map[string]int64{},
		claiming:   map[string]chan struct{}{},
		byUser:     newFailures(o.MaxFailures, o.FailureWindow),
		byAddr:     newFailures(o.MaxAddrFailures, o.FailureWindow),
		byApprover: newFailures(o.MaxFailures, o.FailureWindow),
		remember:   map[string]remembered{},
	}
}

// Options returns the options in effect, defaults filled in.
func (g *Guard) Options() Options { return g.opts }

// Enrolled reports whether user has a secret.
func (g *Guard) Enrolled(user string) bool {
	_, ok := account(g.secrets, user)
	return ok
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

// attempt is one code to verify.
type attempt struct {
	user, addr, code string
	// approver is set for an approval (who approves): the attempt is
	// throttled by, and its failures charged to, the approver's budget
	// alone, and it is no client: nothing is remembered for it and the pool
	// rule does not apply (a spent code must not approve twice).
	approver string
}

func (a attempt) client() bool { return a.approver == "" }

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
}

func (g *Guard) verify(a attempt) Outcome {
	a.code = strings.TrimSpace(a.code)
	for {
		c := g.check(a)
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
func (g *Guard) check(a attempt) checked {
	acct, enrolled := account(g.secrets, a.user)
	claimer, _ := g.secrets.(StepClaimer)

	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.opts.Now()
	g.maybeSweep(now)

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
	for _, start := range c.claim {
		var claimed bool
		claimed, err = c.claimer.ClaimStep(a.user, start, c.acct.Secret)
		if err != nil || claimed {
			if claimed {
				accepted = start
			}
			break
		}
	}
	if err != nil && !errors.Is(err, ErrNotEnrolled) && !errors.Is(err, ErrSecretChanged) && g.opts.OnStoreError != nil {
		g.opts.OnStoreError(a.user, err)
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
	if a.client() {
		g.rememberLocked(a.user, a.addr, acct.Secret, start, now)
	}
}

// usedLocked is the answer to a valid code whose steps were all used: the
// pool rule (Remember) or a replay.
func (g *Guard) usedLocked(a attempt, acct Account, starts []int64, now time.Time, p params) Outcome {
	if a.client() && g.opts.Remember > 0 {
		if r, hit := g.remember[rememberKey(a.user, a.addr)]; hit && now.Before(r.until) && r.secret == acct.Secret {
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
	acct, enrolled := account(g.secrets, user)
	if !enrolled {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	r, hit := g.remember[rememberKey(user, addr)]
	return hit && g.opts.Now().Before(r.until) && r.secret == acct.Secret
}

func (g *Guard) rememberLocked(user, addr, secret string, stepStart int64, now time.Time) {
	if g.opts.Remember > 0 {
		g.remember[rememberKey(user, addr)] = remembered{until: now.Add(g.opts.Remember), stepStart: stepStart, secret: secret}
	}
}

// rememberApproved opens the remember window for a login released by an
// approval: the approver proved the code, the login came from addr.
func (g *Guard) rememberApproved(user, addr string) {
	if g.opts.Remember <= 0 {
		return
	}
	acct, enrolled := account(g.secrets, user)
	if !enrolled {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.rememberLocked(user, addr, acct.Secret, -1, g.opts.Now())
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
	acct, enrolled := account(g.secrets, user)
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
