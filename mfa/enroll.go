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

// Enroll creates a secret for user, writes it to the file (mode 0600) and
// returns the key, whose URL() is the otpauth:// URI for an authenticator. An
// existing user is refused with ErrAlreadyEnrolled unless force, which
// rotates the secret (the old authenticator entry stops working).
func (s *FileStore) Enroll(user string, opts EnrollOptions, force bool) (*otp.Key, error) {
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

	var key *otp.Key
	err := s.update(func(users map[string]storedUser) error {
		if _, exists := users[user]; exists && !force {
			return fmt.Errorf("user %q: %w", user, ErrAlreadyEnrolled)
		}
		// Generated under the lock, after the existence check, so a refused
		// enroll consumes no randomness and writes nothing.
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
			return fmt.Errorf("generate a TOTP secret: %w", err)
		}
		users[user] = storedUser{
			Secret:    k.Secret(),
			Digits:    o.Digits,
			Period:    int(o.Period / time.Second),
			Algorithm: o.Algorithm,
			Issuer:    issuer,
			Enrolled:  now().UTC().Truncate(time.Second),
		}
		key = k
		return nil
	})
	if err != nil {
		return nil, err
	}
	return key, nil
}
