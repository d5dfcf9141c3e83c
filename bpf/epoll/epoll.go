// Package epoll is an epoll set whose Wait parks the calling goroutine in
// Go's netpoller instead of blocking its thread in epoll_wait(2). The
// splicer's watcher (package bpf) and the relay's workers (loop/relay)
// wait on one.
//
// Why: a goroutine blocked in a system call keeps its P (the runtime's
// right to run Go code) until sysmon takes it back, one sysmon tick or
// more later (20 µs at best; ~1 ms once pgmfa quiets sysmon, loop/sysmon).
// The watcher and the relay workers wake on every session's end and then
// block again; with two CPUs, two such threads can hold both Ps, and the
// goroutine that accepts the next client, ready in the netpoller, waits
// until sysmon frees one: pgmfa accepted 1.3–1.9 ms after the client's
// handshake completed against the postmaster's 0.32 ms (README, "Spare
// database connections"). An epoll descriptor is itself pollable — it
// reads ready while its set has events — so the netpoller can watch it
// like a socket: the waiter then sleeps as a parked goroutine, holding no
// thread and no P, and the runtime wakes it when the set has events.
//
// The cost is one more hop on a wake-up (the netpoller's epoll, then this
// set's), paid by the watcher and the relay, which are not on a spliced
// session's data path: the kernel moves those bytes.
package epoll

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Set is an epoll set. Add descriptors with unix.EpollCtl on FD; wait with
// Wait from one goroutine at a time.
type Set struct {
	fd       int
	f        *os.File // owns fd; registered with the netpoller
	rc       syscall.RawConn
	deadline bool // a read deadline is set on f
}

// New creates an empty set registered with Go's netpoller.
func New() (*Set, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	// os.NewFile registers a descriptor with the netpoller only when it is
	// already non-blocking.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("epoll: set non-blocking: %w", err)
	}
	f := os.NewFile(uintptr(fd), "epoll")
	// A deadline can be set only on a descriptor the netpoller accepted:
	// this is the check that waits will not block a thread.
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		return nil, fmt.Errorf("epoll: the netpoller refused the set: %w", err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("epoll: %w", err)
	}
	return &Set{fd: fd, f: f, rc: rc}, nil
}

// FD is the set's descriptor, for epoll_ctl(2). It stays the Set's: never
// close it, and never call Fd on an os.File around it (that would make it
// blocking).
func (s *Set) FD() int { return s.fd }

// Wait fills events with the set's ready events, waiting up to timeout
// (negative: no limit; zero: only what is ready now). It returns 0 and no
// error when the timeout passed first.
func (s *Set) Wait(events []unix.EpollEvent, timeout time.Duration) (int, error) {
	if timeout == 0 {
		return ready(s.fd, events)
	}
	switch {
	case timeout > 0:
		if err := s.f.SetReadDeadline(time.Now().Add(timeout)); err != nil {
			return 0, err
		}
		s.deadline = true
	case s.deadline:
		if err := s.f.SetReadDeadline(time.Time{}); err != nil {
			return 0, err
		}
		s.deadline = false
	}
	var n int
	var werr error
	err := s.rc.Read(func(fd uintptr) bool {
		// Never blocks: when nothing is ready, returning false parks the
		// goroutine until the netpoller sees the set become readable.
		n, werr = ready(int(fd), events)
		return n > 0 || werr != nil
	})
	switch {
	case werr != nil:
		return 0, werr
	case errors.Is(err, os.ErrDeadlineExceeded):
		return 0, nil
	case err != nil:
		return 0, err
	}
	return n, nil
}

// ready takes the events the set holds now, without waiting; an
// interrupted call counts as none.
func ready(fd int, events []unix.EpollEvent) (int, error) {
	n, err := unix.EpollWait(fd, events, 0)
	if err == unix.EINTR {
		return 0, nil
	}
	return max(n, 0), err
}

// Close closes the set. A Wait under way returns an error.
func (s *Set) Close() error { return s.f.Close() }
