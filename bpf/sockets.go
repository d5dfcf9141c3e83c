package bpf

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// Socket helpers for the handoff. All of them work on raw fds: the caller
// hands over duplicated fds that nothing else reads or writes.

// sockKind describes a socket well enough to decide whether it can be
// spliced.
type sockKind struct {
	domain, typ int
}

func (k sockKind) tcp() bool {
	return (k.domain == unix.AF_INET || k.domain == unix.AF_INET6) && k.typ == unix.SOCK_STREAM
}

func (k sockKind) unixStream() bool { return k.domain == unix.AF_UNIX && k.typ == unix.SOCK_STREAM }

func kindOf(fd int) (sockKind, error) {
	d, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return sockKind{}, err
	}
	t, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return sockKind{}, err
	}
	return sockKind{d, t}, nil
}

// cookieOf returns the socket cookie, the key of the socket in every map
// (the verdict program sees the same value through bpf_get_socket_cookie).
func cookieOf(fd int) (uint64, error) {
	return unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
}

// established reports whether a TCP socket can still go into a sockmap:
// the kernel accepts only ESTABLISHED (and LISTEN) TCP sockets, so one that
// already got a FIN (CLOSE_WAIT) or a reset is refused.
func established(fd int) bool {
	ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	return err == nil && ti.State == 1 // TCP_ESTABLISHED
}

// writeProgress returns how many bytes have ever entered fd's TCP send
// queue, up to a constant offset: acknowledged bytes plus bytes still
// queued (SIOCOUTQ = write_seq - snd_una). Only differences between two
// calls mean anything. The result never exceeds the true value (see
// tcpSample), which is the safe side for its one use (deciding that the
// redirect queue is empty).
func writeProgress(fd int) (uint64, error) {
	acked, q, err := tcpSample(fd, unix.SIOCOUTQ, func(ti *unix.TCPInfo) uint64 { return ti.Bytes_acked })
	return acked + q, err
}

// receiveBase returns how many bytes fd had received, up to a constant
// offset, before those still unread in its receive queue: the count the
// verdict program starts from once fd enters the verdict map (every byte
// received after this point, and every unread one, runs through it).
func receiveBase(fd int) (uint64, error) {
	rcvd, q, err := tcpSample(fd, unix.SIOCINQ, func(ti *unix.TCPInfo) uint64 { return ti.Bytes_received })
	return rcvd - q, err
}

// tcpSample reads a TCP_INFO counter and a queue length (ioctl req)
// consistently. They come from separate syscalls, so the counter moving in
// between (an ACK, a segment) would pair values from two moments; reading
// the counter on both sides of the ioctl and retrying until it did not
// move gives a consistent pair.
func tcpSample(fd int, req uint, counter func(*unix.TCPInfo) uint64) (uint64, uint64, error) {
	for range 8 {
		a1, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return 0, 0, err
		}
		q, err := unix.IoctlGetInt(fd, req)
		if err != nil {
			return 0, 0, err
		}
		a2, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return 0, 0, err
		}
		if counter(a1) == counter(a2) {
			return counter(a2), uint64(q), nil
		}
	}
	return 0, 0, errBusy
}

var errBusy = errors.New("socket too busy to sample")

// writeAll writes p to the non-blocking fd, waiting for writability up to
// the deadline. It returns how much was written.
func writeAll(fd int, p []byte, deadline time.Time) (int, error) {
	n := 0
	for n < len(p) {
		w, err := unix.Write(fd, p[n:])
		if w > 0 {
			n += w
		}
		switch {
		case err == nil || err == unix.EINTR:
		case err == unix.EAGAIN:
			left := time.Until(deadline)
			if left <= 0 {
				return n, fmt.Errorf("peer not reading: %d of %d read-ahead bytes written before the deadline", n, len(p))
			}
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
			ms := int(left/time.Millisecond) + 1
			if _, err := unix.Poll(pfd, ms); err != nil && err != unix.EINTR {
				return n, err
			}
		default:
			return n, err
		}
	}
	return n, nil
}

// rcvlowatKick sets SO_RCVLOWAT to 1. Once a socket is in the verdict map
// its sk_data_ready runs the program, but only for data that arrives from
// then on; bytes queued before the insertion would wait for the next
// segment (and forever if the peer is waiting for a reply). Setting
// SO_RCVLOWAT makes TCP call sk_data_ready for what is already queued
// (tcp_set_rcvlowat). The setsockopt also takes the socket lock, which
// makes it a barrier against a verdict running in softirq; see flush.
func rcvlowatKick(fd int) error {
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1)
}

// received returns tcpi_bytes_received (see receiveBase).
func received(fd int) (uint64, error) {
	ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, err
	}
	return ti.Bytes_received, nil
}
