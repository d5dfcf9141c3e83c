package bpf

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// unixUpstream returns the proxy's fd of a unix-socket connection and the
// "server app" end.
func unixUpstream(t testing.TB) (int, net.Conn) {
	path := filepath.Join(t.TempDir(), "pg.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); acc <- c }()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	rc, _ := c.(*net.UnixConn).SyscallConn()
	fd := -1
	rc.Control(func(raw uintptr) { fd, _ = unix.FcntlInt(raw, unix.F_DUPFD_CLOEXEC, 0) })
	c.Close()
	return fd, <-acc
}

// unixPair is a TCP client app and a unix server app with the proxy's two
// fds between them (pc TCP, ps unix).
// needUnixSplice skips when this kernel cannot splice unix-socket
// upstreams (no sockmap iterator; see load), even under CI: it is a
// property of the machine, and the skip says which.
func needUnixSplice(t testing.TB, sp *Splicer) {
	t.Helper()
	if err := sp.UnixUpstreams(); err != nil {
		t.Skipf("unix-socket upstreams are not spliced here: %v", err)
	}
}

func unixPair(t testing.TB, h *harness) *pair {
	p := h.pair()
	unix.Close(p.ps)
	p.server.Close()
	p.ps, p.server = unixUpstream(t)
	return p
}

// TestUnixSplice: a TCP client spliced to a unix-socket server, both ways
// at once, with read-ahead on both sides, sizes from nothing to several
// MiB: byte-exact, read-ahead first, counted, nothing left behind.
func TestUnixSplice(t *testing.T) {
	sp := needSplicer(t, Options{})
	needUnixSplice(t, sp)
	h := newHarness(t)
	fds0 := openFDs(t)
	for _, size := range []int64{0, 1, 100, 70_000, 8<<20 + 5} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			p := unixPair(t, h)
			defer p.close()
			onDone, done := doneChan(t)
			raS, raC := []byte("read-ahead to server;"), []byte("read-ahead to client;")
			if err := sp.Splice(p.pc, p.ps, raS, raC, onDone); err != nil {
				t.Fatal(err)
			}
			// Both ways at once, but the server app half-closes only after
			// it has read everything, as PostgreSQL does (it closes on the
			// client's Terminate); see TestUnixServerCloses.
			var wg sync.WaitGroup
			c2sDone := make(chan struct{})
			check := func(name string, from, to net.Conn, ra []byte, off int, after <-chan struct{}) {
				defer wg.Done()
				go sendStreamAfter(from, size, off, after)
				to.SetReadDeadline(time.Now().Add(time.Minute))
				head := make([]byte, len(ra))
				if _, err := io.ReadFull(to, head); err != nil || !bytes.Equal(head, ra) {
					t.Errorf("%s: read-ahead %q %v", name, head, err)
					return
				}
				got, n, err := recvStream(to)
				if err != nil || n != size || got != hashOf(nil, size, off) {
					t.Errorf("%s: %d of %d bytes, exact %v, err %v", name, n, size, got == hashOf(nil, n, off), err)
				}
			}
			wg.Add(2)
			go func() { check("client->server", p.client, p.server, raS, 0, nil); close(c2sDone) }()
			go check("server->client", p.server, p.client, raC, 7, c2sDone)
			wg.Wait()
			st := waitDone(t, done)
			if st.ClientToServer != uint64(size)+uint64(len(raS)) || st.ServerToClient != uint64(size)+uint64(len(raC)) {
				t.Errorf("stats %+v, want %d each way plus the read-ahead", st, size)
			}
		})
	}
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Errorf("map entries left: %d %v", n, err)
	}
	if n := openFDs(t); n != fds0 {
		t.Errorf("fds: %d before, %d after", fds0, n)
	}
}

// splicedUnix returns a spliced TCP-client/unix-server pair on a fresh
// Splicer.
func splicedUnix(t *testing.T) (*Splicer, *pair, <-chan Stats) {
	sp := needSplicer(t, Options{})
	needUnixSplice(t, sp)
	p := unixPair(t, newHarness(t))
	onDone, done := doneChan(t)
	if err := sp.Splice(p.pc, p.ps, nil, nil, onDone); err != nil {
		p.close()
		t.Fatal(err)
	}
	return sp, p, done
}

// readAllCheck reads c to EOF and fails unless it got exactly want.
func readAllCheck(t *testing.T, c net.Conn, want []byte, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(time.Minute))
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("%s: %d of %d bytes, %v", what, len(got), len(want), err)
	}
}

// TestUnixHalfClose: the client's FIN reaches the database only after
// every byte before it (judged by the kernel's own queue length, read with
// the sockmap iterator: a unix socket has no write_seq), and the database's
// reply still flows back.
func TestUnixHalfClose(t *testing.T) {
	sp, p, done := splicedUnix(t)
	defer p.close()
	last := pattern[:3<<20]
	go func() {
		p.client.Write(last)
		p.client.(interface{ CloseWrite() error }).CloseWrite()
	}()
	readAllCheck(t, p.server, last, "before the FIN")
	back := pattern[5 : 5+2<<20]
	go func() { p.server.Write(back); p.server.Close() }()
	readAllCheck(t, p.client, back, "reply after the client's half-close")
	if st := waitDone(t, done); st.Reason != "client closed" {
		t.Errorf("reason %q, want client closed", st.Reason)
	}
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Errorf("map entries left: %d %v", n, err)
	}
}

// TestUnixServerCloses: the database closing first (as after a
// pg_terminate_backend) ends the session once its last bytes reached the
// client, who sees them and then EOF.
func TestUnixServerCloses(t *testing.T) {
	sp, p, done := splicedUnix(t)
	defer p.close()
	last := pattern[:3<<20]
	go func() { p.server.Write(last); p.server.Close() }()
	readAllCheck(t, p.client, last, "client")
	if st := waitDone(t, done); st.Reason != "server closed" || st.ServerToClient != uint64(len(last)) {
		t.Errorf("stats %+v, want server closed and %d bytes", st, len(last))
	}
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Errorf("map entries left: %d %v", n, err)
	}
}

// TestUnixTransfers: 200 unix-upstream sessions, 16 at a time, sizes
// log-uniform from 1 B to 16 MiB each way, byte-exact.
func TestUnixTransfers(t *testing.T) {
	if testing.Short() {
		t.Skip("GB transfer; skipped with -short")
	}
	sp := needSplicer(t, Options{})
	needUnixSplice(t, sp)
	h := newHarness(t)
	r := rand.New(rand.NewPCG(3, 3))
	size := func() int64 { return int64(math.Exp(r.Float64() * math.Log(16<<20))) }
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	var total int64
	for i := range sessionsFromEnv(t, 200) {
		c2s, s2c := size(), size()
		total += c2s + s2c
		p := unixPair(t, h)
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			defer p.close()
			onDone, done := doneChan(t)
			if err := sp.Splice(p.pc, p.ps, nil, nil, onDone); err != nil {
				t.Errorf("session %d: %v", i, err)
				return
			}
			var inner sync.WaitGroup
			c2sDone := make(chan struct{})
			run := func(from, to net.Conn, n int64, off int, name string, after <-chan struct{}) {
				defer inner.Done()
				go sendStreamAfter(from, n, off, after)
				to.SetReadDeadline(time.Now().Add(2 * time.Minute))
				got, m, err := recvStream(to)
				if err != nil || m != n || got != hashOf(nil, n, off) {
					t.Errorf("session %d %s: %d of %d bytes, err %v", i, name, m, n, err)
				}
			}
			inner.Add(2)
			go func() { run(p.client, p.server, c2s, i, "client->server", nil); close(c2sDone) }()
			go run(p.server, p.client, s2c, 2*i+1, "server->client", c2sDone)
			inner.Wait()
			if st := waitDone(t, done); st.ClientToServer != uint64(c2s) || st.ServerToClient != uint64(s2c) {
				t.Errorf("session %d: stats %+v, want %d/%d", i, st, c2s, s2c)
			}
		}()
	}
	wg.Wait()
	t.Logf("%.2f GB through unix-upstream sessions; sessions ended at the backlog bound: %d", float64(total)/1e9, sp.BacklogLimitEnds())
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Errorf("map entries left: %d %v", n, err)
	}
}

// sendStreamAfter is sendStream whose half-close waits for after (nil: no
// wait).
func sendStreamAfter(c net.Conn, n int64, off int, after <-chan struct{}) {
	if after == nil {
		sendStream(c, n, off)
		return
	}
	sendStream(halfCloseAfter{c, after}, n, off)
}

// halfCloseAfter delays CloseWrite until after is closed.
type halfCloseAfter struct {
	net.Conn
	after <-chan struct{}
}

func (h halfCloseAfter) CloseWrite() error {
	<-h.after
	return h.Conn.(interface{ CloseWrite() error }).CloseWrite()
}

// TestQueueLenIterator: the sockmap iterator sees a socket's redirect
// queue (a socket in targets with nothing queued reads 0; one not in the
// map is not found).
func TestQueueLenIterator(t *testing.T) {
	sp := needSplicer(t, Options{})
	needUnixSplice(t, sp)
	fd, app := unixUpstream(t)
	defer app.Close()
	defer unix.Close(fd)
	c, err := cookieOf(fd)
	if err != nil {
		t.Fatal(err)
	}
	if q, err := sp.obj.queueLen(c); err != nil || q != -1 {
		t.Fatalf("before insertion: %d %v, want -1", q, err)
	}
	if err := sp.obj.Targets.Update(c, uint64(fd), 0); err != nil {
		t.Fatal(err)
	}
	defer sp.obj.Targets.Delete(c)
	if q, err := sp.obj.queueLen(c); err != nil || q != 0 {
		t.Fatalf("in targets: %d %v, want 0", q, err)
	}
}

// TestUnixStalledReader: a database that stops reading while the client
// keeps sending. Towards a unix socket the backlog is estimated from the
// queued skbs (64 KiB each at most); flow control must stop the client
// long before the end of its stream, end nothing, and deliver the whole
// stream exactly once the database reads.
func TestUnixStalledReader(t *testing.T) {
	sp := needSplicer(t, Options{})
	needUnixSplice(t, sp)
	h := newHarness(t)
	p := unixPair(t, h)
	defer p.close()
	onDone, done := doneChan(t)
	if err := sp.Splice(p.pc, p.ps, nil, nil, onDone); err != nil {
		t.Fatal(err)
	}
	const total = 1 << 30
	var written atomic.Int64
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		sendStream(countingConn{p.client, &written}, total, 0)
	}()
	waitQuiet(&written, wdone)
	if w := written.Load(); w >= total/2 {
		t.Fatalf("%d bytes sent towards a database that reads nothing", w)
	}
	t.Logf("client stopped after %.1f MiB", float64(written.Load())/(1<<20))
	p.server.SetReadDeadline(time.Now().Add(5 * time.Minute))
	got, n, err := recvStream(p.server)
	if err != nil || n != total || got != hashOf(nil, total, 0) {
		t.Fatalf("database received %d of %d bytes (%v)", n, total, err)
	}
	p.server.Close()
	if st := waitDone(t, done); st.FlowControl == 0 || st.ClientToServer != total {
		t.Errorf("stats %+v", st)
	}
}

// countingConn counts what is written through it.
type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Write(p []byte) (int, error) {
	w, err := c.Conn.Write(p)
	c.n.Add(int64(w))
	return w, err
}

func (c countingConn) CloseWrite() error { return c.Conn.(*net.TCPConn).CloseWrite() }
