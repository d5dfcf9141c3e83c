package mfa

import (
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
// Throttling and remember state is in memory. The last accepted step is
// also recorded in the store when it is a StepRecorder (FileStore), so a
// restart does not reopen a used code; with other Secrets a restart forgets
// used steps too (a code could be replayed within its skew window).
type Guard struct {
	opts    Options
	secrets Secrets

	mu       sync.Mutex
	used     map[string]int64 // user → unix second at which its last accepted step began
	byUser   *failures
	byAddr   *failures
	remember map[string]remembered
	calls    int
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
		opts:     o,
		secrets:  secrets,
		used:     map[string]int64{},
		byUser:   newFailures(o.MaxFailures, o.FailureWindow),
		byAddr:   newFailures(o.MaxAddrFailures, o.FailureWindow),
		remember: map[string]remembered{},
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
// path; throttling and remember key on the IP or the path).
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
	return g.verify(user, addr, code, true)
}

// verify is Verify; client says whether addr is a client that may be
// remembered (false for approvals: the approver is not the login, and a
// spent code must not approve twice through the pool rule).
func (g *Guard) verify(user, addr, code string, client bool) Outcome {
	o, accepted := g.check(user, addr, code, client)
	if accepted != 0 {
		// Outside the lock: a durable store writes a file.
		if r, ok := g.secrets.(StepRecorder); ok {
			if err := r.RecordStep(user, accepted); err != nil && g.opts.OnRecordError != nil {
				g.opts.OnRecordError(user, err)
			}
		}
	}
	return o
}

// check is verify under the lock; accepted is the start of the step it
// accepted (0: none).
func (g *Guard) check(user, addr, code string, client bool) (o Outcome, accepted int64) {
	acct, enrolled := account(g.secrets, user)
	code = strings.TrimSpace(code)
	akey := throttleKey(addr)

	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.opts.Now()
	g.maybeSweep(now)

	if until, blocked := g.byUser.blockedUntil(user, now); blocked {
		return throttled(user, true, until, now), 0
	}
	if until, blocked := g.byAddr.blockedUntil(akey, now); blocked {
		return throttled(user, false, until, now), 0
	}
	if !enrolled {
		g.byAddr.add(akey, now)
		return NotEnrolled(user), 0
	}
	p, err := resolve(acct, g.opts)
	if err != nil {
		return badAccount(user), 0
	}
	if !wellFormed(code, p) {
		g.fail(user, akey, now)
		return malformed(user, p), 0
	}
	steps, err := matchingSteps(acct.Secret, code, now, g.opts.Skew, p)
	if err != nil {
		return badAccount(user), 0
	}
	if len(steps) == 0 {
		g.fail(user, akey, now)
		return badCode(user, p), 0
	}
	last, seen := g.used[user]
	if acct.LastStep > last {
		// Accepted before a restart (the store keeps it).
		last, seen = acct.LastStep, true
	}
	for _, s := range steps {
		if start := s * p.period; !seen || start > last {
			g.used[user] = start
			// The user proved possession: forgive their failures (the
			// address's budget stays spent).
			g.byUser.reset(user)
			if client {
				g.rememberLocked(user, addr, acct.Secret, start, now)
			}
			return ok, start
		}
	}
	if client && g.opts.Remember > 0 {
		if r, hit := g.remember[rememberKey(user, addr)]; hit && now.Before(r.until) && r.secret == acct.Secret {
			for _, s := range steps {
				if s*p.period == r.stepStart {
					return Outcome{OK: true, Reason: ReasonRemembered}, 0
				}
			}
		}
	}
	return replayed(user, p), 0
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

func (g *Guard) fail(user, akey string, now time.Time) {
	g.byUser.add(user, now)
	g.byAddr.add(akey, now)
}

func (g *Guard) maybeSweep(now time.Time) {
	g.calls++
	if g.calls%sweepEvery != 0 {
		return
	}
	g.byUser.sweep(now)
	g.byAddr.sweep(now)
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
