package bpf

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func closeWrite(t *testing.T, c net.Conn) {
	t.Helper()
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
}

func readN(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

// waitQueued waits until fd's receive queue holds n bytes, so a test can
// splice a socket with data already queued (not a timing assertion: it
// only waits for loopback delivery).
func waitQueued(t *testing.T, fd, n int) {
	t.Helper()
	for range 2000 {
		q, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
		if err != nil {
			t.Fatal(err)
		}
		if q >= n {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("fd %d never had %d bytes queued", fd, n)
}

// TestReadAheadAndQueuedData: the read-ahead arrives first and in order,
// then bytes that were already in the proxy sockets' receive queues before
// the insertion (not stranded), then bytes sent afterwards.
func TestReadAheadAndQueuedData(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	p.client.Write([]byte("[queued-c2s]"))
	p.server.Write([]byte("[queued-s2c]"))
	waitQueued(t, p.pc, 12)
	waitQueued(t, p.ps, 12)
	onDone, done := doneChan(t)
	if err := sp.Splice(p.pc, p.ps, []byte("[ahead-c2s]"), []byte("[ahead-s2c]"), onDone); err != nil {
		t.Fatal(err)
	}
	p.client.Write([]byte("[after]"))
	p.server.Write([]byte("[after]"))
	if got := readN(t, p.server, 30); string(got) != "[ahead-c2s][queued-c2s][after]" {
		t.Errorf("server got %q", got)
	}
	if got := readN(t, p.client, 30); string(got) != "[ahead-s2c][queued-s2c][after]" {
		t.Errorf("client got %q", got)
	}
	closeWrite(t, p.client)
	closeWrite(t, p.server)
	st := waitDone(t, done)
	if st.ClientToServer != 30 || st.ServerToClient != 30 {
		t.Errorf("stats %+v", st)
	}
}

// TestHalfClose: a FIN from one side reaches the other as a FIN (EOF)
// while the other direction keeps flowing; then the second FIN ends the
// session with the first closer as the reason. Both directions.
func TestHalfClose(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	fds0 := openFDs(t)
	for _, first := range []side{sideClient, sideServer} {
		t.Run(first.String()+" first", func(t *testing.T) {
			p := h.pair()
			defer p.close()
			onDone, done := doneChan(t)
			if err := sp.Splice(p.pc, p.ps, nil, nil, onDone); err != nil {
				t.Fatal(err)
			}
			closer, other := p.client, p.server
			if first == sideServer {
				closer, other = p.server, p.client
			}
			closer.Write([]byte("last words"))
			closeWrite(t, closer)
			got, err := io.ReadAll(other)
			if err != nil || string(got) != "last words" {
				t.Fatalf("after FIN: %q %v", got, err)
			}
			// The other direction still flows, in volume.
			big := pattern[:8<<20]
			go func() { other.Write(big); closeWrite(t, other) }()
			back, err := io.ReadAll(closer)
			if err != nil || !bytes.Equal(back, big) {
				t.Fatalf("reverse direction after half-close: %d bytes, %v", len(back), err)
			}
			st := waitDone(t, done)
			if want := first.String() + " closed"; st.Reason != want {
				t.Errorf("reason %q, want %q", st.Reason, want)
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

// TestReset: a reset on either side closes both; the other app sees the
// connection end (EOF or reset), the reason names the side.
func TestReset(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	fds0 := openFDs(t)
	for _, rst := range []side{sideClient, sideServer} {
		t.Run(rst.String(), func(t *testing.T) {
			p := h.pair()
			defer p.close()
			onDone, done := doneChan(t)
			if err := sp.Splice(p.pc, p.ps, nil, nil, onDone); err != nil {
				t.Fatal(err)
			}
			victim, other := p.client, p.server
			if rst == sideServer {
				victim, other = p.server, p.client
			}
			victim.Write([]byte("hi"))
			readN(t, other, 2)
			victim.(*net.TCPConn).SetLinger(0) // close sends RST
			victim.Close()
			st := waitDone(t, done)
			if want := rst.String() + " reset"; st.Reason != want {
				t.Errorf("reason %q, want %q", st.Reason, want)
			}
			_, err := io.ReadAll(other)
			t.Logf("other side after the reset: %v", err)
		})
	}
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Errorf("map entries left: %d %v", n, err)
	}
	if n := openFDs(t); n != fds0 {
		t.Errorf("fds: %d before, %d after", fds0, n)
	}
}

// TestSpliceAfterFIN: a socket that already received FIN cannot go into a
// sockmap; Splice says so before writing anything, leaves no map entry,
// and the fds and read-ahead stay usable by the caller.
func TestSpliceAfterFIN(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	defer unix.Close(p.pc)
	defer unix.Close(p.ps)
	closeWrite(t, p.client)
	// Wait until the proxy's client socket has processed the FIN.
	for range 2000 {
		if !established(p.pc) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	// The kernel itself refuses such a socket (sock_map_sk_state_allowed:
	// TCP sockets only in ESTABLISHED or LISTEN), which is why Splice
	// checks first.
	if err := sp.obj.Targets.Update(cookieMust(t, p.pc), uint64(p.pc), 0); err == nil {
		sp.obj.Targets.Delete(cookieMust(t, p.pc))
		t.Error("the kernel accepted a CLOSE_WAIT socket into a SOCKHASH")
	} else {
		t.Logf("kernel on inserting a socket that got FIN: %v", err)
	}
	err := sp.Splice(p.pc, p.ps, []byte("ahead"), nil, func(Stats) { t.Error("onDone called") })
	var pw *PartialWriteError
	if err == nil || errors.As(err, &pw) {
		t.Fatalf("Splice after FIN: %v, want a plain error", err)
	}
	t.Logf("Splice after FIN: %v", err)
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Fatalf("map entries: %d %v", n, err)
	}
	// Nothing was written: the server app has no bytes; the caller can
	// still write the read-ahead itself.
	p.server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if n, _ := p.server.Read(make([]byte, 8)); n != 0 {
		t.Fatalf("server app got %d bytes from a refused splice", n)
	}
	if _, err := unix.Write(p.ps, []byte("ahead")); err != nil {
		t.Fatal(err)
	}
	p.server.SetReadDeadline(time.Time{})
	if got := readN(t, p.server, 5); string(got) != "ahead" {
		t.Fatalf("got %q", got)
	}
}

// TestCloseTearsDown: Close ends live sessions with "proxy shutdown",
// closes their fds and calls onDone before returning.
func TestCloseTearsDown(t *testing.T) {
	if err := Probe(); err != nil {
		needSplicer(t, Options{}) // skips or fails with the reason
	}
	h := newHarness(t)
	h.pair().close() // Go's netpoller fds exist from here on
	fds0 := openFDs(t)
	sp, err := NewSplicer(Options{})
	if err != nil {
		t.Fatal(err)
	}
	var dones []<-chan Stats
	for range 3 {
		p := h.pair()
		defer p.close()
		onDone, done := doneChan(t)
		if err := sp.Splice(p.pc, p.ps, nil, nil, onDone); err != nil {
			t.Fatal(err)
		}
		dones = append(dones, done)
	}
	if n := sp.Sessions(); n != 3 {
		t.Fatalf("Sessions() = %d", n)
	}
	if err := sp.Close(); err != nil {
		t.Fatal(err)
	}
	for _, done := range dones {
		select {
		case st := <-done:
			if st.Reason != "proxy shutdown" {
				t.Errorf("reason %q", st.Reason)
			}
		default:
			t.Fatal("onDone not called before Close returned")
		}
	}
	if n := openFDs(t); n != fds0+6 { // the six app conns are still open
		t.Errorf("fds: %d before, %d after Close (want only the 6 app conns left)", fds0, n)
	}
	if err := sp.Splice(0, 0, nil, nil, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Splice after Close: %v", err)
	}
}
