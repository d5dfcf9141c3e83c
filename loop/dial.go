package loop

import (
	"context"
	"errors"
	"net"
	"os"
	"time"

	"github.com/panjf2000/gnet/v2"
	"golang.org/x/sys/unix"
)

// Dialing the database.
//
// gnet's EventLoop.Register dials with net.Dial on its worker pool. For
// TCP that is a non-blocking connect(2) and, on EINPROGRESS, a wait in Go's
// netpoller for the socket to become writable. pgmfa's event loops block
// in their own epoll_wait, not in the netpoller, so on a machine with as
// many Ps as loops nobody polls it but sysmon, which does so only when the
// netpoller has not been polled for 10 ms: the dial step of a login took
// 2.1–2.7 ms over loopback TCP against 0.34 ms for a unix-socket upstream
// (whose connect completes at once) in the same run (`make bench-smoke`'s
// login breakdown, 2026-12-02). dialTCP connects with a blocking
// connect(2) instead, on its own goroutine: the goroutine sleeps in the
// kernel and wakes with the answer, and its thread takes its P back on
// return (a blocking syscall, not a netpoller wait). The connected socket
// is then enrolled on the loop (EventLoop.Enroll) as before. A unix-socket
// upstream is dialed the same way with net.Dial (its connect completes at
// once), so that both kinds can come from the spare pool (loop/spare),
// which usually has one connected already.

// DefaultSpareMaxAge is how long a spare database connection is kept
// unused: below PostgreSQL's default authentication_timeout (60 s), after
// which the backend gives up waiting for its StartupMessage.
const DefaultSpareMaxAge = 30 * time.Second

// register opens a connection to the database on this conn's loop with
// side (an *upstreamSide or a *cancelSide) as its gnet context: a spare
// one when the pool has one ready (package loop/spare), else a new one. A
// failure is reported to failed on the loop.
func (c *conn) register(side any, failed func(error)) {
	fail := func(err error) { c.exec(func() { failed(err) }) }
	go func() {
		nc := c.srv.spares.Get()
		if u, ok := side.(*upstreamSide); ok && nc != nil {
			u.spare = true // read on the loop once Enroll has handed side over
		}
		if nc == nil {
			var err error
			if nc, err = c.srv.dialUpstream(); err != nil {
				fail(err)
				return
			}
		}
		ch, err := c.loop.Enroll(gnet.NewContext(context.Background(), side), nc)
		if err != nil {
			nc.Close()
			fail(err)
			return
		}
		// Enroll closes nc once it holds a duplicate of its socket; gnet
		// reports a failure only on this channel.
		if r := <-ch; r.Err != nil {
			fail(r.Err)
		}
	}()
}

// dialUpstream connects to the database: over TCP with dialTCP; to a unix
// socket with net.Dial, whose connect completes at once (or fails).
func (s *Server) dialUpstream() (net.Conn, error) {
	if tcp, ok := s.upAddr.(*net.TCPAddr); ok {
		return dialTCP(tcp, s.cfg.HandshakeTimeout)
	}
	return net.DialTimeout(s.upAddr.Network(), s.upAddr.String(), s.cfg.HandshakeTimeout)
}

// TCP keepalive as net.Dial sets it (Go's defaults: probes after 15 s idle,
// every 15 s, 9 of them), which the database sockets always had.
const (
	keepAliveIdle     = 15
	keepAliveInterval = 15
	keepAliveCount    = 9
)

// dialTCP connects to addr with a blocking connect(2), bounded by timeout
// (SO_SNDTIMEO bounds a blocking connect), and returns the socket as a
// net.Conn. Its errors read as net.Dial's ("dial tcp ADDR: connect: …").
func dialTCP(addr *net.TCPAddr, timeout time.Duration) (net.Conn, error) {
	opErr := func(err error) error {
		return &net.OpError{Op: "dial", Net: "tcp", Addr: addr, Err: err}
	}
	domain, sa := unix.AF_INET6, unix.Sockaddr(nil)
	if ip4 := addr.IP.To4(); ip4 != nil {
		domain = unix.AF_INET
		s := &unix.SockaddrInet4{Port: addr.Port}
		copy(s.Addr[:], ip4)
		sa = s
	} else {
		s := &unix.SockaddrInet6{Port: addr.Port}
		copy(s.Addr[:], addr.IP.To16())
		if addr.Zone != "" {
			if ifi, err := net.InterfaceByName(addr.Zone); err == nil {
				s.ZoneId = uint32(ifi.Index)
			}
		}
		sa = s
	}
	fd, err := unix.Socket(domain, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, opErr(os.NewSyscallError("socket", err))
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
		return nil, opErr(os.NewSyscallError("setsockopt", err))
	}
	// A login's messages are small and answered one by one: never hold
	// one back for Nagle (gnet sets the same on the sockets it dials).
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveIdle)
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveInterval)
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount)
	if err := connect(fd, sa, timeout); err != nil {
		return nil, opErr(err)
	}
	// The sends of the session must not time out: SO_SNDTIMEO was for
	// the connect only (the socket is non-blocking from here on anyway).
	zero := unix.Timeval{}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &zero)
	f := os.NewFile(uintptr(fd), "upstream")
	ok = true
	nc, err := net.FileConn(f) // a duplicate; f's descriptor is closed below
	f.Close()
	if err != nil {
		return nil, opErr(err)
	}
	return nc, nil
}

// connect is a blocking connect(2). A signal (the Go runtime preempts
// threads with SIGURG) interrupts it with EINTR while the handshake goes
// on; then it waits for the outcome with poll(2), still outside the
// netpoller. A connect that SO_SNDTIMEO cut short is EINPROGRESS.
func connect(fd int, sa unix.Sockaddr, timeout time.Duration) error {
	err := unix.Connect(fd, sa)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINPROGRESS):
		return os.NewSyscallError("connect", unix.ETIMEDOUT)
	case !errors.Is(err, unix.EINTR):
		return os.NewSyscallError("connect", err)
	}
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return os.NewSyscallError("connect", unix.ETIMEDOUT)
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(pfd, int(left.Milliseconds())+1)
		if errors.Is(err, unix.EINTR) || (err == nil && n == 0) {
			continue
		}
		if err != nil {
			return os.NewSyscallError("poll", err)
		}
		soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return os.NewSyscallError("getsockopt", err)
		}
		if soErr != 0 {
			return os.NewSyscallError("connect", unix.Errno(soErr))
		}
		return nil
	}
}
