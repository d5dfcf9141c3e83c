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
	// step began, as recorded by a StepRecorder (0: none). A restarted
	// proxy refuses that step and any before it (RFC 6238 §5.2).
	LastStep int64
}

// StepRecorder is implemented by secret sources that keep the last accepted
// time step durably (FileStore does), so a code stays single-use across a
// restart of the proxy.
type StepRecorder interface {
	RecordStep(user string, stepStart int64) error
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
