package bpf

import (
	"errors"
	"fmt"
)

// ErrClosed is returned by Splice after Close.
var ErrClosed = errors.New("bpf: splicer closed")

// ErrNotEstablished is wrapped by Splice's refusal of a socket that is no
// longer established: its peer already sent FIN or a reset, and the kernel
// refuses such a socket in a sockmap. A client that logs in and quits at
// once gets here routinely (it has its ReadyForQuery before the splice, see
// loop/handoff.go); the caller relays what is left instead.
var ErrNotEstablished = errors.New("no longer established (it already received FIN or a reset); not spliced")

// ErrHandingOver is returned by Splice while HandOver is under way: the
// caller relays the session instead (nothing was changed).
var ErrHandingOver = errors.New("bpf: the splicer is handing its sessions over to another process; not spliced")

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
