// Package tlsproxy runs pgmfa's TLS sessions: client connections that use
// TLS (an SSLRequest answered 'S', or a direct TLS handshake) and sessions
// whose database connection uses TLS (--upstream-sslmode other than
// disable).
//
// # Goroutines, deliberately
//
// The plaintext path of package loop never blocks: gnet drives every login
// and the kernel (or the bounded epoll relay) carries the session. crypto/tls
// is a blocking API, so this package does not follow that shape: each
// connection it runs has goroutines of its own.
//
//   - During the login, one goroutine owns the session machine (package
//     proto/session) and is the only one that ever touches it. It reads the
//     client itself while only the client speaks (the startup phase, TLS
//     handshake included); after that one reader goroutine per socket feeds
//     it over channels, and it waits on those, the MFA decision and the
//     deadline in one select. So a login holds one to three goroutines.
//   - At the release the login goroutine exits and the two readers become
//     the relay, one per direction, each with a fixed buffer (io.Copy's
//     shape): an established TLS session costs two goroutines. A read that
//     was in flight at the release is written on by its reader after
//     everything the login held, so no byte is lost or reordered.
//
// This is accepted for TLS only: encrypted sessions cannot be spliced in the
// kernel anyway (no kTLS on the target kernels, and kTLS sockets cannot join
// a sockmap), so every byte of them passes through user space regardless.
//
// # Ends
//
// The client's end of stream is passed on as a half-close (close_notify and
// FIN) to the database, which finishes the session; the database's end (or
// any error) ends the session on both sides. Driver.Close closes every
// socket of every session, logins included, and waits for the goroutines.
//
// The package also dials the database with TLS the way libpq's sslmode
// does (Dialer), and holds the reloadable client-facing certificate
// (Certs).
package tlsproxy
