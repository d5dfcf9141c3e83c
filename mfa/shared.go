package mfa

import (
	"crypto/sha256"
	"encoding/hex"
	"time"
)

// AccountLoader is implemented by stores whose lookups can fail (a database
// over the network). The Guard prefers it to Accounts: a lookup that fails
// refuses the login with ReasonStoreDown instead of calling the user not
// enrolled.
type AccountLoader interface {
	LoadAccount(user string) (acct Account, enrolled bool, err error)
}

// Shared is implemented by stores that keep, for every instance of a fleet,
// the policy state a Guard otherwise keeps in its own memory: the failure
// counters behind throttling and the --mfa-remember grants. A Guard over a
// Shared store reads the counters and the grant a login needs from the
// store before deciding, and writes what it decided back, so a fleet of
// proxies throttles and remembers as one. Counting is not transactional: a
// burst spread over several instances may pass a few attempts over the
// limit before every instance sees the count (the code's single use, which
// is what makes a guess worthless once used, is atomic: ClaimStepGrant).
//
// Failure keys are namespaced by the Guard ("user:NAME", "addr:IP",
// "approver:WHO").
type Shared interface {
	StepClaimer
	// Failures returns, for each key that has any, the times of its
	// failures at or after since, oldest first.
	Failures(keys []string, since time.Time) (map[string][]time.Time, error)
	// AddFailure records one failure at at under every key.
	AddFailure(keys []string, at time.Time) error
	// ResetFailures forgets key's failures.
	ResetFailures(key string) error
	// Grant returns the remember grant under key, if one is valid at now.
	Grant(key string, now time.Time) (Grant, bool, error)
	// PutGrant writes a grant under key (an approved login's window).
	PutGrant(key string, grant Grant) error
	// ClaimStepGrant is ClaimStep that, when it claims, also writes grant
	// under grantKey in the same transaction (grantKey "": no grant): a
	// login that loses the claim and then reads the grant sees the winner's
	// (the pool rule across instances).
	ClaimStepGrant(user string, stepStart int64, secret string, grantKey string, grant Grant) (bool, error)
}

// Grant is one --mfa-remember window: user from an address passes without
// a code until Until. StepStart is the accepted step (the pool rule);
// SecretTag names the secret it was proved with (SecretTag), so rotating
// the secret ends the window.
type Grant struct {
	Until     time.Time
	StepStart int64
	SecretTag string
}

// SecretTag identifies a secret without revealing it: a store may keep it
// next to a grant in plaintext.
func SecretTag(secret string) string {
	sum := sha256.Sum256([]byte("pgmfa grant\x00" + secret))
	return hex.EncodeToString(sum[:12])
}

// Failure-key namespaces of Shared.
func userKey(user string) string  { return "user:" + user }
func addrKey(addr string) string  { return "addr:" + throttleKey(addr) }
func approverKey(w string) string { return "approver:" + w }
