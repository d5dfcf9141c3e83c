package bpf

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// TestLiveCountsAndEnd: a Live's counts are the kernel's, growing while
// bytes move and equal to what each app received once they are read (the
// read-ahead included); End tears the session down with its reason, both
// apps see the end, and the Live then reports ErrEnded; a second End does
// nothing.
func TestLiveCountsAndEnd(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	h.pair().close()
	fds0 := openFDs(t)
	p := h.pair()
	defer p.close()
	onDone, done := doneChan(t)
	live, err := sp.SpliceLive(p.pc, p.ps, []byte("up"), []byte("down!"), nil, onDone)
	if err != nil {
		t.Fatal(err)
	}
	counts := func() (uint64, uint64) {
		t.Helper()
		c2s, s2c, err := live.Counts()
		if err != nil {
			t.Fatal(err)
		}
		return c2s, s2c
	}
	readAll := func(c io.Reader, n int) {
		t.Helper()
		if _, err := io.ReadFull(c, make([]byte, n)); err != nil {
			t.Fatal(err)
		}
	}
	readAll(p.server, 2)
	readAll(p.client, 5)
	if c2s, s2c := counts(); c2s != 2 || s2c != 5 {
		t.Fatalf("counts after the read-ahead: %d, %d", c2s, s2c)
	}
	const n = 8 << 20
	go p.client.Write(bytes.Repeat([]byte{'x'}, n))
	readAll(p.server, n/2)
	mid, _ := counts()
	if mid < n/2+2 {
		t.Fatalf("mid-stream count %d below what the server already read (%d)", mid, n/2+2)
	}
	readAll(p.server, n/2)
	go p.server.Write(bytes.Repeat([]byte{'y'}, 1000))
	readAll(p.client, 1000)
	if c2s, s2c := counts(); c2s != n+2 || s2c != 1005 {
		t.Fatalf("counts %d, %d; want %d, %d", c2s, s2c, n+2, 1005)
	}

	if !live.End("ended by test") {
		t.Fatal("End of a live session reported it gone")
	}
	st := waitDone(t, done)
	if st.Reason != "ended by test" || st.ClientToServer != n+2 || st.ServerToClient != 1005 {
		t.Fatalf("stats %+v", st)
	}
	for _, c := range []net.Conn{p.client, p.server} {
		_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal("an app's connection is still open after End")
		}
	}
	if _, _, err := live.Counts(); !errors.Is(err, ErrEnded) {
		t.Fatalf("Counts after End: %v", err)
	}
	if live.End("again") {
		t.Fatal("End of an ended session reported it live")
	}
	select {
	case st := <-done:
		t.Fatalf("a second end: %+v", st)
	case <-time.After(100 * time.Millisecond):
	}
	p.close()
	checkEnded(t, sp, fds0)
}
