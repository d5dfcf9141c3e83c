// Package mfa is pgmfa's second factor: TOTP verification (RFC 6238, via
// github.com/pquerna/otp), the per-user secret store, and the policy around
// a code — single use per time step, throttling of failures per user and per
// client address, an optional "remember" window, and out-of-band approvals.
//
// The package is pure and deterministic: the clock and the randomness are
// injected (Options.Now, EnrollOptions.Rand), nothing is global, and the only
// I/O is FileStore's own file. Everything here is safe for concurrent use by
// the proxy's event loops.
package mfa
