package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
)

// The bare sockmap: the floor of the kernel's design, measured in the same
// run as the product (path sockmap-bare).
//
// A process with no proxy logic at all: it accepts a client, connects to
// PostgreSQL, puts both sockets into one SOCKHASH whose stream verdict
// redirects every segment to the peer, and never reads a byte. Even the
// login travels through the kernel. The verdict is the smallest that
// works: look the receiving socket's cookie up in a peer map, redirect to
// the peer (egress), pass when there is none. No flow control, no
// accounting, no FIN forwarding: a session ends when either side hangs up
// (both sockets are closed then). So whatever pgmfa-sockmap loses against
// it at one client is pgmfa's; whatever it loses against direct is the
// kernel's redirect path (the kworker hop, see README "Performance").
//
// It runs as a child of the benchmark (the same binary, -serve-bare-sockmap)
// so its CPU and context switches are counted like a proxy's.

// bareVerdict builds the verdict program for a peer map (cookie → peer
// cookie) and the SOCKHASH (cookie → socket).
func bareVerdict(peers, socks *ebpf.Map) (*ebpf.Program, error) {
	const skPass = 1
	return ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:    "bare_verdict",
		Type:    ebpf.SkSKB,
		License: "Dual BSD/GPL",
		Instructions: asm.Instructions{
			asm.Mov.Reg(asm.R6, asm.R1),
			// The cookie of the socket the segment arrived on.
			asm.FnGetSocketCookie.Call(),
			asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
			asm.LoadMapPtr(asm.R1, peers.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -8),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "pass"),
			asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord),
			asm.StoreMem(asm.RFP, -16, asm.R1, asm.DWord),
			// bpf_sk_redirect_hash(skb, socks, &peer, 0): egress of the peer.
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.LoadMapPtr(asm.R2, socks.FD()),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, -16),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnSkRedirectHash.Call(),
			// SK_DROP when the peer is not in the map: pass instead, never
			// drop bytes TCP has acknowledged.
			asm.JEq.Imm(asm.R0, 0, "pass"),
			asm.Return(),
			asm.Mov.Imm(asm.R0, skPass).WithSymbol("pass"),
			asm.Return(),
		},
	})
}

// bareSplicer holds the maps and the attached program.
type bareSplicer struct {
	peers, socks *ebpf.Map
	prog         *ebpf.Program
}

func newBareSplicer(max uint32) (*bareSplicer, error) {
	b := &bareSplicer{}
	var err error
	if b.peers, err = ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 8, ValueSize: 8, MaxEntries: max}); err != nil {
		return nil, fmt.Errorf("peer map: %w", err)
	}
	if b.socks, err = ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SockHash, KeySize: 8, ValueSize: 8, MaxEntries: max}); err != nil {
		b.close()
		return nil, fmt.Errorf("sockhash: %w", err)
	}
	if b.prog, err = bareVerdict(b.peers, b.socks); err != nil {
		b.close()
		return nil, fmt.Errorf("verdict program: %w", err)
	}
	if err = link.RawAttachProgram(link.RawAttachProgramOptions{Target: b.socks.FD(), Program: b.prog, Attach: ebpf.AttachSkSKBStreamVerdict}); err != nil {
		b.close()
		return nil, fmt.Errorf("attach verdict: %w", err)
	}
	return b, nil
}

func (b *bareSplicer) close() {
	for _, c := range []interface{ Close() error }{b.prog, b.socks, b.peers} {
		if c != nil && !isNilCloser(c) {
			c.Close()
		}
	}
}

func isNilCloser(c interface{ Close() error }) bool {
	switch v := c.(type) {
	case *ebpf.Map:
		return v == nil
	case *ebpf.Program:
		return v == nil
	}
	return false
}

// splice puts a connected pair into the maps. Bytes the client sent before
// the insertion (its StartupMessage, typically) sit in its receive queue
// where the verdict never saw them: SO_RCVLOWAT makes the kernel run the
// verdict over them now (the same kick pgmfa uses, bpf/splice.go).
func (b *bareSplicer) splice(cfd, sfd int) error {
	cc, err := unix.GetsockoptUint64(cfd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return err
	}
	sc, err := unix.GetsockoptUint64(sfd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return err
	}
	if err := b.peers.Put(cc, sc); err != nil {
		return err
	}
	if err := b.peers.Put(sc, cc); err != nil {
		return err
	}
	// The database's socket first: PostgreSQL sends nothing before the
	// StartupMessage, while the client's bytes may arrive at any moment
	// and must find their peer in the map.
	for _, p := range [][2]uint64{{sc, uint64(sfd)}, {cc, uint64(cfd)}} {
		if err := b.socks.Update(p[0], p[1], ebpf.UpdateAny); err != nil {
			return err
		}
	}
	for _, fd := range []int{cfd, sfd} {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1); err != nil {
			return err
		}
	}
	return nil
}

func (b *bareSplicer) forget(cfd, sfd int) {
	for _, fd := range []int{cfd, sfd} {
		if ck, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE); err == nil {
			_ = b.peers.Delete(ck)
		}
	}
	unix.Close(cfd)
	unix.Close(sfd)
}

// serveBare is the child process: listen, splice every connection to
// upstream, until SIGTERM.
func serveBare(listen, upstream string) error {
	b, err := newBareSplicer(1 << 16)
	if err != nil {
		return err
	}
	defer b.close()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	defer ln.Close()
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	// peer pairs the sockets; gen tells a hang-up of this pair from a late
	// one of an earlier pair whose descriptor numbers were reused.
	type reg struct{ peer, gen int }
	peer := map[int]reg{}
	gen := 0
	go func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
		<-ch
		ln.Close()
	}()
	accepted := make(chan [2]int)
	go func() {
		defer close(accepted)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", upstream)
			if err != nil {
				fmt.Fprintln(os.Stderr, "bare: dial:", err)
				c.Close()
				continue
			}
			cfd, err1 := detach(c)
			sfd, err2 := detach(s)
			if err := errors.Join(err1, err2); err != nil {
				fmt.Fprintln(os.Stderr, "bare:", err)
				continue
			}
			accepted <- [2]int{cfd, sfd}
		}
	}()
	hup := make(chan [2]int, 64)
	go func() {
		// One goroutine waits; the main loop owns the maps and the fds.
		events := make([]unix.EpollEvent, 64)
		for {
			n, err := unix.EpollWait(ep, events, -1)
			if err != nil && !errors.Is(err, unix.EINTR) {
				return
			}
			for i := 0; i < n; i++ {
				hup <- [2]int{int(events[i].Fd), int(events[i].Pad)}
			}
		}
	}()
	for {
		select {
		case p, ok := <-accepted:
			if !ok {
				return nil
			}
			cfd, sfd := p[0], p[1]
			if err := b.splice(cfd, sfd); err != nil {
				fmt.Fprintln(os.Stderr, "bare: splice:", err)
				b.forget(cfd, sfd)
				continue
			}
			gen++
			peer[cfd], peer[sfd] = reg{sfd, gen}, reg{cfd, gen}
			for _, fd := range []int{cfd, sfd} {
				ev := unix.EpollEvent{Events: unix.EPOLLRDHUP | unix.EPOLLHUP | unix.EPOLLERR | unix.EPOLLONESHOT, Fd: int32(fd), Pad: int32(gen)}
				_ = unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &ev)
			}
		case h := <-hup:
			fd := h[0]
			r, ok := peer[fd]
			if !ok || r.gen != h[1] {
				continue
			}
			delete(peer, fd)
			delete(peer, r.peer)
			_ = unix.EpollCtl(ep, unix.EPOLL_CTL_DEL, fd, nil)
			_ = unix.EpollCtl(ep, unix.EPOLL_CTL_DEL, r.peer, nil)
			b.forget(fd, r.peer)
		}
	}
}

// detach takes the socket out of Go's poller: a duplicate the caller owns
// (blocking mode does not matter, it is never read or written).
func detach(c net.Conn) (int, error) {
	defer c.Close()
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(f uintptr) { fd, derr = unix.Dup(int(f)) }); err != nil {
		return -1, err
	}
	return fd, derr
}

// bareServeArg is the hidden first argument that makes the benchmark
// binary the bare splicer (main.go).
const bareServeArg = "-serve-bare-sockmap"

// startBare starts the bare splicer in front of the cluster.
func startBare(ps *procs, cl *pgcluster.Cluster, dir string) *endpoint {
	ep := &endpoint{Name: pathBare, Host: "127.0.0.1"}
	self, err := os.Executable()
	if err != nil {
		ep.Err = err
		return ep
	}
	if ep.Err = os.MkdirAll(dir, 0o700); ep.Err != nil {
		return ep
	}
	if ep.Port, ep.Err = pgcluster.FreePort(); ep.Err != nil {
		return ep
	}
	startServer(ps, ep, "bare sockmap", dir, "bare.log", self, bareServeArg, ep.Addr(), cl.Addr())
	return ep
}
