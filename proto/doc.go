// Package proto is pgmfa's view of the PostgreSQL v3 wire protocol during
// login: framing of the startup and typed messages, the errors a login can
// end with, and pure authentication state machines.
//
// Everything here is a step function over bytes and pgproto3 messages. The
// package does no I/O, reads no clock and uses no global randomness: nonces
// and salts come from an io.Reader the caller injects. That keeps every path
// of a login (including hostile ones) testable without sockets, and lets the
// event loop drive many logins without a goroutine per connection.
//
// The machines:
//
//   - Passthrough relays a client's authentication exchange with the
//     database and holds everything from AuthenticationOk on, so that MFA can
//     be checked before the client is let in.
//   - UpstreamLogin logs in to the database as a client (trust, cleartext,
//     MD5, SCRAM-SHA-256 with the server signature verified).
//   - ServerLogin authenticates a client against stored PostgreSQL verifiers
//     (pg_authid.rolpassword formats), like pgbouncer does.
//
// None of the machines ever tells a client AuthenticationOk by itself: the
// caller does, with LoginResult.AppendReady, once MFA has passed.
package proto
