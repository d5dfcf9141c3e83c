package relay

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tcpPair returns the two ends of a loopback TCP connection; the second is
// returned as a dup'd raw fd for the relay to own.
func tcpPair(t *testing.T) (outer net.Conn, innerFD int) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	outer, err = net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	inner := <-accepted
	f, err := inner.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	inner.Close()
	fd, err := dupFD(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { outer.Close() })
	return outer, fd
}

func dupFD(f *os.File) (int, error) {
	defer f.Close()
	return unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
}

func newRelay(t *testing.T, opts Options) *Relay {
	t.Helper()
	r, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// TestBytesExact sends random data both ways through relayed pairs, with
// read-ahead on both sides, and checks every byte arrives in order.
func TestBytesExact(t *testing.T) {
	r := newRelay(t, Options{BufferSize: 16 << 10, Workers: 2})
	const sessions = 40
	var wg sync.WaitGroup
	for i := 0; i < sessions; i++ {
		client, cfd := tcpPair(t)
		server, sfd := tcpPair(t)
		rng := rand.New(rand.NewPCG(uint64(i), 7))
		// Log-uniform sizes from 1 byte to 8 MiB.
		size := func() int { return int(math.Exp2(rng.Float64() * 23)) }
		up, down := randBytes(rng, size()), randBytes(rng, size())
		headUp, headDown := randBytes(rng, rng.IntN(100)), randBytes(rng, rng.IntN(100))
		done := make(chan Stats, 1)
		if _, err := r.Add(cfd, sfd, headUp, headDown, func(s Stats) { done <- s }); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var inner sync.WaitGroup
			inner.Add(2)
			var gotUp, gotDown []byte
			go func() { defer inner.Done(); gotUp, _ = io.ReadAll(server) }()
			go func() { defer inner.Done(); gotDown, _ = io.ReadAll(client) }()
			go func() { client.Write(up); client.(*net.TCPConn).CloseWrite() }()
			go func() { server.Write(down); server.(*net.TCPConn).CloseWrite() }()
			inner.Wait()
			if h1, h2 := sha256.Sum256(append(headUp, up...)), sha256.Sum256(gotUp); h1 != h2 {
				t.Errorf("session %d: client→server: got %d bytes, want %d (hash mismatch)", i, len(gotUp), len(headUp)+len(up))
			}
			if h1, h2 := sha256.Sum256(append(headDown, down...)), sha256.Sum256(gotDown); h1 != h2 {
				t.Errorf("session %d: server→client: got %d bytes, want %d (hash mismatch)", i, len(gotDown), len(headDown)+len(down))
			}
			select {
			case st := <-done:
				if st.ClientToServer != uint64(len(headUp)+len(up)) || st.ServerToClient != uint64(len(headDown)+len(down)) {
					t.Errorf("session %d: stats %+v", i, st)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("session %d: onDone not called after both sides closed", i)
			}
		}()
	}
	wg.Wait()
	if n := r.Sessions(); n != 0 {
		t.Fatalf("%d sessions still live", n)
	}
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// TestHalfCloseKeepsOtherDirection: the client's FIN reaches the server as
// EOF while the server can still send.
func TestHalfCloseKeepsOtherDirection(t *testing.T) {
	r := newRelay(t, Options{})
	client, cfd := tcpPair(t)
	server, sfd := tcpPair(t)
	done := make(chan Stats, 1)
	if _, err := r.Add(cfd, sfd, nil, nil, func(s Stats) { done <- s }); err != nil {
		t.Fatal(err)
	}
	client.Write([]byte("bye"))
	client.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(server)
	if err != nil || string(got) != "bye" {
		t.Fatalf("server read %q, %v", got, err)
	}
	server.Write([]byte("still here"))
	buf := make([]byte, 10)
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "still here" {
		t.Fatalf("client read %q, %v", buf, err)
	}
	server.Close()
	st := <-done
	if st.Reason == "" {
		t.Fatal("no reason")
	}
}

// TestSlowReaderIsBounded: a reader that stops reading must not make the
// relay buffer what the writer keeps sending. The writer gets stuck once the
// relay's buffer and both kernels' socket buffers are full.
func TestSlowReaderIsBounded(t *testing.T) {
	r := newRelay(t, Options{BufferSize: 64 << 10, Workers: 1})
	client, cfd := tcpPair(t)
	server, sfd := tcpPair(t)
	if _, err := r.Add(cfd, sfd, nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	// The "server" sends 256 MiB; the client reads nothing.
	var sent int64
	var mu sync.Mutex
	chunk := bytes.Repeat([]byte("x"), 1<<20)
	stop := make(chan struct{})
	go func() {
		for i := 0; i < 256; i++ {
			server.SetWriteDeadline(time.Now().Add(time.Second))
			n, err := server.Write(chunk)
			mu.Lock()
			sent += int64(n)
			mu.Unlock()
			if err != nil {
				break
			}
		}
		close(stop)
	}()
	<-stop
	mu.Lock()
	defer mu.Unlock()
	// Everything the writer got rid of is in socket buffers (bounded by the
	// kernel's tcp_rmem/tcp_wmem maxima) plus at most one relay buffer.
	// With 256 MiB offered, an unbounded relay would have taken it all.
	if sent >= 256<<20 {
		t.Fatalf("writer sent all %d bytes to a reader that reads nothing: the relay buffered without bound", sent)
	}
	t.Logf("writer got %d MiB out before flow control stopped it", sent>>20)
	// And the data still arrives intact once the reader reads.
	server.Close()
	got, _ := io.Copy(io.Discard, client)
	if got != sent {
		t.Fatalf("reader got %d bytes, writer sent %d", got, sent)
	}
}

func TestAddAfterClose(t *testing.T) {
	r, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	if _, err := r.Add(0, 1, nil, nil, nil); err != ErrClosed {
		t.Fatalf("Add after Close: %v", err)
	}
}

// TestReadAheadAloneIsDelivered: the bytes handed over with the pair go out
// even when neither side sends anything (the login's release travels this
// way, and the client waits for it before it says a word).
func TestReadAheadAloneIsDelivered(t *testing.T) {
	r := newRelay(t, Options{})
	client, cfd := tcpPair(t)
	server, sfd := tcpPair(t)
	if _, err := r.Add(cfd, sfd, []byte("to server"), []byte("to client"), nil); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		conn net.Conn
		want string
	}{{client, "to client"}, {server, "to server"}} {
		c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, len(c.want))
		if _, err := io.ReadFull(c.conn, buf); err != nil || string(buf) != c.want {
			t.Fatalf("got %q, %v; want %q", buf, err, c.want)
		}
	}
}

// TestSessionCountsAndEnd: Session.Counts, read from another goroutine
// while bytes move (the race detector watches), reaches exactly what was
// moved; Session.End closes both sockets and reports its reason once;
// ending again does nothing.
func TestSessionCountsAndEnd(t *testing.T) {
	r := newRelay(t, Options{BufferSize: 4 << 10, Workers: 1})
	client, cfd := tcpPair(t)
	server, sfd := tcpPair(t)
	done := make(chan Stats, 2)
	s, err := r.Add(cfd, sfd, []byte("hi"), nil, func(st Stats) { done <- st })
	if err != nil {
		t.Fatal(err)
	}
	const n = 1 << 20
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
				s.Counts()
			}
		}
	}()
	go client.Write(bytes.Repeat([]byte{'x'}, n))
	server.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(server, make([]byte, n+2)); err != nil {
		t.Fatal(err)
	}
	close(stop)
	deadline := time.Now().Add(5 * time.Second)
	for {
		c2s, s2c := s.Counts()
		if c2s == n+2 && s2c == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("counts %d, %d; want %d, 0", c2s, s2c, n+2)
		}
		time.Sleep(time.Millisecond)
	}
	s.End("ended by test")
	select {
	case st := <-done:
		if st.Reason != "ended by test" || st.ClientToServer != n+2 {
			t.Fatalf("stats %+v", st)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("End did not end the session")
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Fatal("the client's socket is still open")
	}
	s.End("again")
	select {
	case st := <-done:
		t.Fatalf("a second end: %+v", st)
	case <-time.After(100 * time.Millisecond):
	}
}
