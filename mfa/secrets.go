package mfa

import "time"

// Secrets is where per-user TOTP secrets come from.
type Secrets interface {
	// Secret returns user's base32 TOTP secret.
	Secret(user string) (secret string, ok bool)
}

// Account is one user's enrollment: the secret and the TOTP parameters it
// was enrolled with. Zero parameters mean the Guard's defaults.
type Account struct {
	Secret    string        // base32, padding optional
	Digits    int           // 6 or 8
	Period    time.Duration // whole seconds
	Algorithm string        // SHA1, SHA256 or SHA512
	// LastStep is the unix second at which the last accepted code's time
	// step began, as recorded by a StepClaimer (0: none). A Guard refuses
	// that step and any before it (RFC 6238 §5.2).
	LastStep int64
}

// StepClaimer is implemented by stores that keep the last accepted time
// step per user where every proxy sharing the store sees it (FileStore
// does). ClaimStep is the single-use check and the write in one atomic step
// against the store — a compare-and-set, never a read then a write: it
// records stepStart as user's last accepted step and returns true only if
// the stored one was before it. false means the step (or a later one) was
// already accepted, by this process or another. secret is the secret the
// code was checked against; a store that holds another one now refuses
// with ErrSecretChanged.
//
// With Secrets that are not a StepClaimer, a code is single-use within one
// Guard only.
type StepClaimer interface {
	ClaimStep(user string, stepStart int64, secret string) (claimed bool, err error)
}

// Accounts is implemented by secret sources that record the TOTP parameters
// per user (FileStore does). The Guard prefers it to Secrets, so that a later
// change of the defaults does not break the authenticators already set up.
type Accounts interface {
	Account(user string) (Account, bool)
}

// account looks user up, preferring the richer interface.
func account(s Secrets, user string) (Account, bool) {
	if a, ok := s.(Accounts); ok {
		return a.Account(user)
	}
	secret, ok := s.Secret(user)
	return Account{Secret: secret}, ok
}
