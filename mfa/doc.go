// Package mfa is pgmfa's second factor: TOTP verification (RFC 6238, via
// github.com/pquerna/otp), the per-user secret store, and the policy around
// a code — single use per time step, throttling of failures per user and per
// client address, an optional "remember" window, and out-of-band approvals.
//
// The package is pure and deterministic: the clock and the randomness are
// injected (Options.Now, EnrollOptions.Rand), nothing is global, and the only
// I/O is FileStore's own file. Everything here is safe for concurrent use.
// Accepting a code claims its time step in the store (FileStore: an flock,
// a read and a synced write), so Guard.Verify and Approvals.Approve belong
// off event loops; Guard.Remembered, Guard.Enrolled and Approvals.Wait do no
// I/O.
package mfa
