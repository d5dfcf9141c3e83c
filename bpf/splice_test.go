package bpf

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestSpliceSmoke(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	onDone, done := doneChan(t)
	if err := sp.Splice(p.pc, p.ps, []byte("hello "), []byte("welcome "), onDone); err != nil {
		t.Fatal(err)
	}
	// 2 targets + 2 verdict sockets + 2 directions + 2 relayed counts;
	// nothing drained.
	if n, err := sp.MapEntries(); n != 8 || err != nil {
		t.Errorf("map entries of a live session: %d %v, want 8", n, err)
	}
	if n := sp.Sessions(); n != 1 {
		t.Errorf("Sessions() = %d", n)
	}
	if _, err := p.client.Write([]byte("query")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 11)
	if _, err := io.ReadFull(p.server, buf); err != nil || string(buf) != "hello query" {
		t.Fatalf("server got %q, %v", buf, err)
	}
	if _, err := p.server.Write([]byte("rows")); err != nil {
		t.Fatal(err)
	}
	buf = make([]byte, 12)
	if _, err := io.ReadFull(p.client, buf); err != nil || string(buf) != "welcome rows" {
		t.Fatalf("client got %q, %v", buf, err)
	}
	p.client.(interface{ CloseWrite() error }).CloseWrite()
	rest, err := io.ReadAll(p.server)
	if err != nil || len(rest) != 0 {
		t.Fatalf("server after client FIN: %q %v", rest, err)
	}
	p.server.Write([]byte("bye"))
	p.server.(interface{ CloseWrite() error }).CloseWrite()
	rest, err = io.ReadAll(p.client)
	if err != nil || !bytes.Equal(rest, []byte("bye")) {
		t.Fatalf("client after server FIN: %q %v", rest, err)
	}
	st := waitDone(t, done)
	t.Logf("%+v", st)
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Fatalf("map entries left: %d %v", n, err)
	}
}

// Bytes a peer sent before the splice that nobody read (pgbench -C sends
// its query the moment it has ReadyForQuery, which can be before the
// client socket enters the verdict map) are still in TCP's receive queue:
// the verdict forwards them once the socket is in, and the end-of-session
// audit must count them on the right side of its base. A TCP socket in a
// sockmap answers SIOCINQ from its psock, so a base taken after the first
// map insertion counted them as received before the splice and the audit
// reported "TCP received 5 bytes, the program saw 67" (doc.go).
func TestSpliceUnreadBeforeSplice(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	if _, err := p.client.Write([]byte("early query")); err != nil {
		t.Fatal(err)
	}
	if _, err := p.server.Write([]byte("early notice")); err != nil {
		t.Fatal(err)
	}
	// Both are in the proxy's receive queues before Splice (loopback
	// delivers at once; wait until TCP has them).
	for _, fd := range []int{p.pc, p.ps} {
		deadline := time.Now().Add(10 * time.Second)
		for {
			if q, err := unix.IoctlGetInt(fd, unix.SIOCINQ); err == nil && q > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the early bytes never reached the proxy's socket")
			}
			time.Sleep(time.Millisecond)
		}
	}
	anomalies := sp.Anomalies()
	onDone, done := doneChan(t)
	if err := sp.Splice(p.pc, p.ps, nil, []byte("ready "), onDone); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len("early query"))
	if _, err := io.ReadFull(p.server, buf); err != nil || string(buf) != "early query" {
		t.Fatalf("server got %q, %v", buf, err)
	}
	buf = make([]byte, len("ready early notice"))
	if _, err := io.ReadFull(p.client, buf); err != nil || string(buf) != "ready early notice" {
		t.Fatalf("client got %q, %v", buf, err)
	}
	p.client.(interface{ CloseWrite() error }).CloseWrite()
	if rest, err := io.ReadAll(p.server); err != nil || len(rest) != 0 {
		t.Fatalf("server after client FIN: %q %v", rest, err)
	}
	p.server.(interface{ CloseWrite() error }).CloseWrite()
	if rest, err := io.ReadAll(p.client); err != nil || len(rest) != 0 {
		t.Fatalf("client after server FIN: %q %v", rest, err)
	}
	st := waitDone(t, done)
	if st.Anomaly != "" || sp.Anomalies() != anomalies {
		t.Fatalf("the audit counted the unread bytes wrong: %q", st.Anomaly)
	}
	if st.ClientToServer != uint64(len("early query")) || st.ServerToClient != uint64(len("ready early notice")) {
		t.Fatalf("byte counts %d/%d", st.ClientToServer, st.ServerToClient)
	}
}

// A map insertion the kernel refuses because the peer closed in the
// meantime reads as ErrNotEstablished (the routine case: a client that
// quit right after its login); one refused for another reason keeps the
// kernel's error and says what may have happened.
func TestRefusedInsert(t *testing.T) {
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	kernel := unix.EOPNOTSUPP
	if err := refusedInsert(sideClient, p.pc, true, "a hint", kernel); errors.Is(err, ErrNotEstablished) || !errors.Is(err, kernel) || !strings.Contains(err.Error(), "a hint") {
		t.Fatalf("an established socket: %v", err)
	}
	p.client.Close() // the proxy's client socket receives FIN: CLOSE_WAIT
	for deadline := time.Now().Add(5 * time.Second); established(p.pc); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the socket is still established 5 s after its peer closed")
		}
	}
	if err := refusedInsert(sideClient, p.pc, true, "a hint", kernel); !errors.Is(err, ErrNotEstablished) || !errors.Is(err, kernel) {
		t.Fatalf("a socket whose peer closed: %v", err)
	}
	if err := refusedInsert(sideServer, p.pc, false, "a hint", kernel); errors.Is(err, ErrNotEstablished) {
		t.Fatalf("a socket that is not TCP (a unix upstream) is never judged by TCP state: %v", err)
	}
}
