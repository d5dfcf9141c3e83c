package bpf

import (
	"errors"
	"fmt"
)

// ErrClosed is returned by Splice after Close.
var ErrClosed = errors.New("bpf: splicer closed")

// ErrUnixUnsupported is returned by Splice for a pair whose server side is
// a unix socket, before anything changed: the caller still owns the fds
// and relays the session in user space.
//
// Why (measured on 6.18, see TestUnixEgressKernelBehaviour): redirecting
// TCP bytes to a unix socket's egress works, but the other direction never
// moves. For AF_UNIX the skb handed to the verdict (unix_stream_read_skb)
// is still owned by the sending socket, the database's end in another
// process, so bpf_get_socket_cookie(skb) returns that socket's cookie, not
// the proxy's: the direction lookup misses, the program passes, and the
// bytes sit readable in the proxy's unix socket that nobody reads any
// more. That is the login hang the design notes recorded (ReadyForQuery
// never reaches the client). Keying the direction by the sender's cookie
// makes it flow, but the proxy would have to learn the database end's
// cookie (sock_diag) and the backlog bound would need another measure
// (a unix socket has no write_seq), so it is not done.
var ErrUnixUnsupported = errors.New("bpf: kernel splicing does not support a unix-socket upstream (the kernel reports the database end's socket for bytes it sends, so they would never be forwarded); use the user-space relay")

// PartialWriteError reports that Splice failed after it had already changed
// the byte streams: some or all of the read-ahead reached its destination,
// or one direction had started to move in the kernel. The fds are still
// the caller's, but no relay can continue these streams faithfully, so the
// caller must close both.
type PartialWriteError struct {
	// ToServer and ToClient are the read-ahead bytes written to each side.
	ToServer, ToClient int
	// Err is what stopped the handoff.
	Err error
}

func (e *PartialWriteError) Error() string {
	return fmt.Sprintf("bpf: handoff failed after the byte streams changed (%d read-ahead bytes written to the server, %d to the client): %v",
		e.ToServer, e.ToClient, e.Err)
}

func (e *PartialWriteError) Unwrap() error { return e.Err }
