package mfa

import (
	"fmt"
	"strings"
	"time"

	"github.com/pquerna/otp"
)

// Defaults for the zero values of Options.
const (
	DefaultDigits          = 6
	DefaultPeriod          = 30 * time.Second
	DefaultSkew            = 1
	DefaultAlgorithm       = "SHA1"
	DefaultMaxFailures     = 5
	DefaultFailureWindow   = 5 * time.Minute
	DefaultMaxAddrFailures = 20
)

// NoSkew in Options.Skew accepts a code of the current time step only (the
// zero value stands for DefaultSkew, like every zero in Options).
const NoSkew = -1

// Options for TOTP and the policy around it. Zero values mean the defaults
// shown. Digits, Period and Algorithm are the defaults for users whose secret
// source does not record their own (FileStore records them at enrollment).
type Options struct {
	Digits          int           // 6 (6 or 8)
	Period          time.Duration // 30s; whole seconds
	Skew            int           // steps accepted either side of now: 1; NoSkew (negative): the current step only
	Algorithm       string        // "SHA1" | "SHA256" | "SHA512"
	MaxFailures     int           // per user, and per approver (Approvals), within FailureWindow: 5; negative: no limit
	FailureWindow   time.Duration // 5m
	MaxAddrFailures int           // per client address (IP without port) within FailureWindow: 20; negative: no limit
	// Remember: 0 = off. After a success, the same user from the same client
	// address passes without a code until it expires.
	Remember time.Duration
	Now      func() time.Time // time.Now when nil
	// OnStoreError is told when a StepClaimer failed to claim an accepted
	// code's step (the login is then refused: ReasonStore).
	OnStoreError func(user string, err error)
	// OnStoreCall, if set, is told of every store call a Guard makes: its
	// operation (one of StoreOps), how long it took, and its error (nil
	// when the store answered, even with "not enrolled"). It is for
	// metrics: it changes nothing, and must be safe for concurrent use.
	OnStoreCall func(op string, took time.Duration, err error)
}

// The store operations a Guard reports to Options.OnStoreCall. Only calls
// that can do I/O are reported: a FileStore's reads are from memory.
const (
	StoreOpLoadAccount   = "load_account"   // AccountLoader.LoadAccount
	StoreOpClaimStep     = "claim_step"     // StepClaimer.ClaimStep or Shared.ClaimStepGrant
	StoreOpFailures      = "failures"       // Shared.Failures
	StoreOpAddFailure    = "add_failure"    // Shared.AddFailure
	StoreOpResetFailures = "reset_failures" // Shared.ResetFailures
	StoreOpGrant         = "grant"          // Shared.Grant
	StoreOpPutGrant      = "put_grant"      // Shared.PutGrant
)

// StoreOps lists every operation OnStoreCall may report.
var StoreOps = []string{StoreOpLoadAccount, StoreOpClaimStep, StoreOpFailures, StoreOpAddFailure,
	StoreOpResetFailures, StoreOpGrant, StoreOpPutGrant}

// Validate reports the first unusable field, in words an operator can act
// on. NewGuard panics on options that do not validate, so callers that take
// them from flags should call Validate first.
func (o Options) Validate() error {
	if err := validateTOTP(o.Digits, o.Period, o.Algorithm); err != nil {
		return err
	}
	if o.FailureWindow < 0 {
		return fmt.Errorf("failure window must not be negative, got %v", o.FailureWindow)
	}
	if o.Remember < 0 {
		return fmt.Errorf("remember window must not be negative, got %v", o.Remember)
	}
	return nil
}

// validateTOTP checks the three parameters a code depends on; zero values
// stand for the defaults.
func validateTOTP(digits int, period time.Duration, algorithm string) error {
	if digits != 0 && digits != 6 && digits != 8 {
		return fmt.Errorf("TOTP digits must be 6 or 8, got %d", digits)
	}
	if period < 0 || period%time.Second != 0 {
		return fmt.Errorf("TOTP period must be a positive whole number of seconds, got %v", period)
	}
	if _, err := parseAlgorithm(algorithm); err != nil {
		return err
	}
	return nil
}

// withDefaults fills the zero values.
func (o Options) withDefaults() Options {
	if o.Digits == 0 {
		o.Digits = DefaultDigits
	}
	if o.Period == 0 {
		o.Period = DefaultPeriod
	}
	switch {
	case o.Skew == 0:
		o.Skew = DefaultSkew
	case o.Skew < 0:
		o.Skew = NoSkew
	}
	if o.Algorithm == "" {
		o.Algorithm = DefaultAlgorithm
	}
	o.Algorithm, _ = canonicalAlgorithm(o.Algorithm)
	if o.MaxFailures == 0 {
		o.MaxFailures = DefaultMaxFailures
	}
	if o.FailureWindow == 0 {
		o.FailureWindow = DefaultFailureWindow
	}
	if o.MaxAddrFailures == 0 {
		o.MaxAddrFailures = DefaultMaxAddrFailures
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// canonicalAlgorithm maps the spellings people use ("sha1", "SHA-256") to
// the one written in otpauth URIs and the store.
func canonicalAlgorithm(s string) (string, error) {
	switch strings.ReplaceAll(strings.ToUpper(strings.TrimSpace(s)), "-", "") {
	case "", "SHA1":
		return "SHA1", nil
	case "SHA256":
		return "SHA256", nil
	case "SHA512":
		return "SHA512", nil
	}
	return "", fmt.Errorf("TOTP algorithm must be SHA1, SHA256 or SHA512, got %q", s)
}

func parseAlgorithm(s string) (otp.Algorithm, error) {
	c, err := canonicalAlgorithm(s)
	if err != nil {
		return 0, err
	}
	switch c {
	case "SHA256":
		return otp.AlgorithmSHA256, nil
	case "SHA512":
		return otp.AlgorithmSHA512, nil
	}
	return otp.AlgorithmSHA1, nil
}
