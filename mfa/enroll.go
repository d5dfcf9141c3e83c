package mfa

import (
	"fmt"
	"io"
	"time"

	"github.com/pquerna/otp"
	"github.com/pquerna/otp/totp"
)

// EnrollOptions are the parameters of a new enrollment. Zero values mean the
// defaults shown.
type EnrollOptions struct {
	Issuer    string        // "pgmfa": the name authenticator apps show
	Digits    int           // 6 (6 or 8)
	Period    time.Duration // 30s; whole seconds
	Algorithm string        // "SHA1" | "SHA256" | "SHA512"
	// SecretSize in bytes; 0 means the size of the HMAC's output (20, 32 or
	// 64 bytes), the key length RFC 6238's own test vectors use.
	SecretSize int
	Rand       io.Reader        // crypto/rand when nil
	Now        func() time.Time // time.Now when nil; only stamps the enrollment
}

// DefaultIssuer is the issuer in otpauth URIs when none is given.
const DefaultIssuer = "pgmfa"

// Enrollment is one user's stored enrollment, as every store keeps it.
type Enrollment struct {
	Secret    string // base32, no padding (plaintext: stores seal it)
	Digits    int
	Period    int // seconds
	Algorithm string
	Issuer    string
	Enrolled  time.Time
	LastStep  int64 // unix second of the last accepted code's step (0: none)
}

// Account is the enrollment as the Guard uses it.
func (e Enrollment) Account() Account {
	return Account{Secret: e.Secret, Digits: e.Digits, Period: time.Duration(e.Period) * time.Second, Algorithm: e.Algorithm, LastStep: e.LastStep}
}

// Check rejects an enrollment that could never verify a code.
func (e Enrollment) Check() error {
	return storedUser{Secret: e.Secret, Digits: e.Digits, Period: e.Period, Algorithm: e.Algorithm}.check()
}

// Enrollers validate opts and return a generator for the user; it is
// called under the store's lock, after the existence check, so a refused
// enroll consumes no randomness and writes nothing.
func enroller(user string, opts EnrollOptions) (func() (*otp.Key, Enrollment, error), error) {
	if err := validUser(user); err != nil {
		return nil, err
	}
	if err := validateTOTP(opts.Digits, opts.Period, opts.Algorithm); err != nil {
		return nil, err
	}
	if opts.SecretSize < 0 {
		return nil, fmt.Errorf("secret size must not be negative, got %d", opts.SecretSize)
	}
	o := Options{Digits: opts.Digits, Period: opts.Period, Algorithm: opts.Algorithm}.withDefaults()
	issuer := opts.Issuer
	if issuer == "" {
		issuer = DefaultIssuer
	}
	size := opts.SecretSize
	if size == 0 {
		size = map[string]int{"SHA1": 20, "SHA256": 32, "SHA512": 64}[o.Algorithm]
	}
	alg, _ := parseAlgorithm(o.Algorithm)
	digits := otp.DigitsSix
	if o.Digits == 8 {
		digits = otp.DigitsEight
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	return func() (*otp.Key, Enrollment, error) {
		k, err := totp.Generate(totp.GenerateOpts{
			Issuer:      issuer,
			AccountName: user,
			Period:      uint(o.Period / time.Second),
			SecretSize:  uint(size),
			Digits:      digits,
			Algorithm:   alg,
			Rand:        opts.Rand,
		})
		if err != nil {
			return nil, Enrollment{}, fmt.Errorf("generate a TOTP secret: %w", err)
		}
		return k, Enrollment{
			Secret:    k.Secret(),
			Digits:    o.Digits,
			Period:    int(o.Period / time.Second),
			Algorithm: o.Algorithm,
			Issuer:    issuer,
			Enrolled:  now().UTC().Truncate(time.Second),
		}, nil
	}, nil
}

// NewEnrollment validates opts and generates a new secret for user (for
// stores other than FileStore: they write it under their own lock).
func NewEnrollment(user string, opts EnrollOptions) (*otp.Key, Enrollment, error) {
	gen, err := enroller(user, opts)
	if err != nil {
		return nil, Enrollment{}, err
	}
	return gen()
}

// Enroll creates a secret for user, writes it to the file (mode 0600) and
// returns the key, whose URL() is the otpauth:// URI for an authenticator. An
// existing user is refused with ErrAlreadyEnrolled unless force, which
// rotates the secret (the old authenticator entry stops working).
func (s *FileStore) Enroll(user string, opts EnrollOptions, force bool) (*otp.Key, error) {
	gen, err := enroller(user, opts)
	if err != nil {
		return nil, err
	}
	var key *otp.Key
	err = s.update(func(users map[string]storedUser) error {
		if _, exists := users[user]; exists && !force {
			return fmt.Errorf("user %q: %w", user, ErrAlreadyEnrolled)
		}
		k, e, err := gen()
		if err != nil {
			return err
		}
		users[user] = storedUser(e)
		key = k
		return nil
	})
	if err != nil {
		return nil, err
	}
	return key, nil
}

// Enrollments returns every enrollment in the file (`pgmfa store migrate`).
func (s *FileStore) Enrollments() map[string]Enrollment {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make(map[string]Enrollment, len(s.users))
	for name, u := range s.users {
		out[name] = Enrollment(u)
	}
	return out
}

// CodeFor returns acct's code at t (`pgmfa code` on any store).
func CodeFor(acct Account, t time.Time) (string, error) {
	return accountCode(acct, Options{}.withDefaults(), t)
}

// ValidUser reports whether user is a name a store accepts.
func ValidUser(user string) error { return validUser(user) }
