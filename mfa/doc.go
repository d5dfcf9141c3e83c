// Package mfa is pgmfa's second factor: TOTP verification (RFC 6238, via
// github.com/pquerna/otp), the per-user secret store, and the policy around
// a code — single use per time step, throttling of failures per user and per
// client address, an optional "remember" window, and out-of-band approvals.
//
// The package is pure and deterministic: the clock and the randomness are
// injected (Options.Now, EnrollOptions.Rand), nothing is global, and the only
// I/O is FileStore's own file and whatever the store given to a Guard does.
// Everything here is safe for concurrent use.
//
// Stores: FileStore (a JSON file, one host) and, in mfa/pgstore, a
// PostgreSQL store a fleet of proxies shares. A store that implements
// Shared moves the Guard's throttling and remember state into the store; one
// that implements Fleet shares the logins waiting for approval. Secrets are
// sealed at rest with a Keyring (seal.go: AES-256-GCM, the user name as
// associated data, a key id per record).
//
// Blocking: with any store, Guard.Verify, Guard.Remembered,
// Guard.CheckEnrolled, Approvals.Wait, Approvals.Approve and Approvals.List
// may do store I/O (a network round trip for PostgreSQL). An event loop
// never calls them itself: it runs them on a goroutine and turns the answer
// into a loop event (loop/conn.go askMFA does so with gnet's Execute), so a
// slow store delays only the logins waiting on it. A store that cannot
// answer refuses the login (ReasonStoreDown, ReasonStore): fail closed.
package mfa
