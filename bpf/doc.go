// Package bpf hands authenticated pgmfa sessions to the kernel.
//
// Once a session has passed MFA, its client socket and database socket are
// put into an eBPF SOCKHASH whose sk_skb stream verdict program (splice.c)
// redirects every received byte to the other socket's send side, so the
// proxy never touches the traffic again. A single watcher goroutine per
// Splicer follows the sockets for half-closes, resets and directions at
// the backlog bound; see Splicer for the life of a spliced pair and splice.c for
// the program and its backlog bound.
//
// The kernel behaviour this package relies on was measured on Linux 6.18;
// every quirk it works around is explained where it is handled. In short:
//
//   - The FIN reaches the verdict as an empty skb; redirecting or passing
//     it breaks a socket's transmit side (EPIPE from the psock kworker), so
//     the program drops it and the watcher forwards the FIN as
//     shutdown(SHUT_WR) once the redirect queue before it has drained.
//   - Redirected bytes wait in the destination's psock queue, charged to no
//     socket: a stalled reader let 1 GiB pile up there while TCP's memory
//     counters showed 5 MiB. The program measures that queue per skb and
//     the session ends at Options.MaxBacklog ("backlog limit").
//   - A pause/resume bound (pass the bytes at the bound, move them to the
//     destination in user space, redirect again) was built and dropped: on
//     this kernel it duplicated one to three whole skbs (65,483 bytes
//     each) in 3 of 6 runs of the multi-GB tests, probably because reading a
//     sockmap socket can fall back to tcp_recvmsg on skbs that
//     tcp_read_skb later hands to the verdict again in full.
//   - Inserting a TCP socket that already received FIN fails (EOPNOTSUPP:
//     only ESTABLISHED sockets are accepted); Splice checks first.
//   - For an AF_UNIX upstream the verdict sees the database's end as the
//     owner of the bytes it sends (a unix skb stays charged to its
//     sender), so that direction is keyed under the database end's cookie,
//     found with unix_diag (unixPeerCookie), as well as under the proxy's
//     own. A unix socket has no write_seq: towards one, the backlog counts
//     queued skbs as 64 KiB each, and "queue drained" before a FIN is read
//     from the kernel with a sockmap iterator (pgmfa_queues). The verdict
//     of a unix socket takes one skb per wake-up and SO_RCVLOWAT does not
//     wake it, so the unix socket enters the verdict map before anything
//     is written to the database. When the database's end shuts down, the
//     kernel takes the proxy's end out of every sockmap; the session ends
//     there (PostgreSQL never half-closes).
package bpf
