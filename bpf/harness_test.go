package bpf

import (
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"golang.org/x/sys/unix"
)

// The harness: for each session a "client app" and a "server app" (plain
// Go TCP conns the test reads and writes) and, between them, the proxy's
// two sockets as raw fds handed to Splice.
//
//	client app <-> pc (proxy, client side) ~~splice~~ ps (proxy, server side) <-> server app

// needSplicer skips unless BPF splicing works here (fails under CI=true).
func needSplicer(t testing.TB, opts Options) *Splicer {
	t.Helper()
	if err := Probe(); err != nil {
		pgtest.SkipOrFail(t, "kernel splicing unavailable: %v", err)
	}
	if opts.Logger == nil && os.Getenv("PGMFA_SPLICE_DEBUG") != "" {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	sp, err := NewSplicer(opts)
	if err != nil {
		t.Fatalf("NewSplicer: %v", err)
	}
	t.Cleanup(func() { sp.Close() })
	return sp
}

type pair struct {
	client, server net.Conn // the apps
	pc, ps         int      // the proxy's fds
}

// harness owns the two listeners sessions are made from.
type harness struct {
	t          testing.TB
	proxyLn    net.Listener // the proxy accepts clients here
	upstreamLn net.Listener // the "server app" accepts the proxy here
	mu         sync.Mutex   // one pair at a time, so accepts match dials
}

func newHarness(t testing.TB) *harness {
	h := &harness{t: t}
	var err error
	if h.proxyLn, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	if h.upstreamLn, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.proxyLn.Close(); h.upstreamLn.Close() })
	return h
}

// dupFD returns a duplicate of c's fd and closes c (Go's poller forgets
// the socket; the duplicate keeps it open), as gnet's Dup+Close does.
func dupFD(t testing.TB, c net.Conn) int {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	var derr error
	rc.Control(func(raw uintptr) { fd, derr = unix.FcntlInt(raw, unix.F_DUPFD_CLOEXEC, 0) })
	if derr != nil {
		t.Fatal(derr)
	}
	c.Close()
	return fd
}

// pair makes one session's four sockets, all connected.
func (h *harness) pair() *pair {
	h.t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	p := &pair{}
	var wg sync.WaitGroup
	var pcConn, psConn net.Conn
	var e1, e2 error
	wg.Add(2)
	go func() { defer wg.Done(); pcConn, e1 = h.proxyLn.Accept() }()
	go func() { defer wg.Done(); p.server, e2 = h.upstreamLn.Accept() }()
	var err error
	if p.client, err = net.Dial("tcp", h.proxyLn.Addr().String()); err != nil {
		h.t.Fatal(err)
	}
	if psConn, err = net.Dial("tcp", h.upstreamLn.Addr().String()); err != nil {
		h.t.Fatal(err)
	}
	wg.Wait()
	if e1 != nil || e2 != nil {
		h.t.Fatal(e1, e2)
	}
	p.pc, p.ps = dupFD(h.t, pcConn), dupFD(h.t, psConn)
	return p
}

func (p *pair) close() {
	p.client.Close()
	p.server.Close()
}

// doneChan returns an onDone that delivers the Stats on a channel and
// fails the test if it is called twice.
func doneChan(t testing.TB) (func(Stats), <-chan Stats) {
	ch := make(chan Stats, 1)
	var once sync.Once
	return func(st Stats) {
		called := false
		once.Do(func() { called = true; ch <- st })
		if !called {
			t.Errorf("onDone called twice (%+v)", st)
		}
	}, ch
}

// waitDone waits for a session's end; the only timeout is a generous
// guard against hanging the whole test run, not an assertion on speed.
func waitDone(t testing.TB, ch <-chan Stats) Stats {
	t.Helper()
	select {
	case st := <-ch:
		return st
	case <-time.After(2 * time.Minute):
		t.Fatal("session never ended")
		return Stats{}
	}
}

func openFDs(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// checkEnded reports what a run of sessions left behind and fails on what
// it must not: sessions, map entries, fds beyond fds0, and byte counts the
// end-of-session audit found at odds with TCP's.
func checkEnded(t *testing.T, sp *Splicer, fds0 int) {
	t.Helper()
	ep, rel := sp.FlowControl()
	dups, dupBytes := sp.KernelDuplicates()
	t.Logf("flow control: %d episodes, %.1f MB moved in user space; ended at the hard bound: %d; skbs the kernel handed over again: %d (%d bytes removed)",
		ep, float64(rel)/1e6, sp.BacklogLimitEnds(), dups, dupBytes)
	if n := sp.Anomalies(); n != 0 {
		t.Errorf("%d sessions whose byte counts disagree with TCP's (see the log)", n)
	}
	if n := sp.Sessions(); n != 0 {
		t.Errorf("%d sessions still live", n)
	}
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Errorf("%d map entries left (%v)", n, err)
	}
	if n := openFDs(t); n != fds0 {
		t.Errorf("open fds: %d before, %d after", fds0, n)
	}
}
