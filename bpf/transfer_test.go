package bpf

import (
	"fmt"
	"hash/maphash"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// sessionsFromEnv returns the number of sessions for the transfer tests:
// PGMFA_SPLICE_SESSIONS overrides def (CI may lower it only if needed).
func sessionsFromEnv(t *testing.T, def int) int {
	if v := os.Getenv("PGMFA_SPLICE_SESSIONS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("PGMFA_SPLICE_SESSIONS=%q: want a positive integer", v)
		}
		return n
	}
	return def
}

// pattern is the byte source for the transfers: random bytes in a block
// whose odd length keeps a stream from lining up with itself.
var pattern = func() []byte {
	b := make([]byte, 8<<20+13)
	r := rand.NewChaCha8([32]byte{'p', 'g', 'm', 'f', 'a'})
	r.Read(b)
	return b
}()

var hashSeed = maphash.MakeSeed()

// sendStream writes n bytes of the pattern starting at off, hashing them,
// then half-closes.
func sendStream(c net.Conn, n int64, off int) (uint64, error) {
	var h maphash.Hash
	h.SetSeed(hashSeed)
	off %= len(pattern)
	for n > 0 {
		chunk := pattern[off:min(len(pattern), off+256<<10)]
		if int64(len(chunk)) > n {
			chunk = chunk[:n]
		}
		w, err := c.Write(chunk)
		h.Write(chunk[:w])
		if err != nil {
			return 0, err
		}
		n -= int64(w)
		off = (off + w) % len(pattern)
	}
	return h.Sum64(), c.(interface{ CloseWrite() error }).CloseWrite()
}

// recvStream reads to EOF, hashing.
func recvStream(c net.Conn) (uint64, int64, error) {
	var h maphash.Hash
	h.SetSeed(hashSeed)
	buf := make([]byte, 256<<10)
	var n int64
	for {
		r, err := c.Read(buf)
		h.Write(buf[:r])
		n += int64(r)
		if err == io.EOF {
			return h.Sum64(), n, nil
		}
		if err != nil {
			return 0, n, err
		}
	}
}

// logUniform draws a size log-uniformly from [1, max].
func logUniform(r *rand.Rand, max int64) int64 {
	return int64(math.Exp(r.Float64() * math.Log(float64(max+1))))
}

// transfer runs one session: both apps send their stream and half-close,
// both read to EOF; the hashes and counts must match on each end, and the
// splicer's stats must agree.
func transfer(t *testing.T, sp *Splicer, h *harness, id int, c2s, s2c int64) error {
	p := h.pair()
	defer p.close()
	// Part of each stream goes as read-ahead (written by Splice itself).
	raC, raS := min(c2s, int64(id%7)), min(s2c, int64(id%5))
	toServer := pattern[id : id+int(raC)]
	toClient := pattern[id+1 : id+1+int(raS)]
	onDone, done := doneChan(t)
	if err := sp.Splice(p.pc, p.ps, toServer, toClient, onDone); err != nil {
		return fmt.Errorf("splice: %w", err)
	}
	type res struct {
		sum uint64
		n   int64
		err error
	}
	var sentC, sentS, gotS, gotC res
	var wg sync.WaitGroup
	wg.Add(4)
	go func() { defer wg.Done(); sentC.sum, sentC.err = sendStream(p.client, c2s-raC, id+int(raC)) }()
	go func() { defer wg.Done(); sentS.sum, sentS.err = sendStream(p.server, s2c-raS, id+1+int(raS)) }()
	go func() { defer wg.Done(); gotS.sum, gotS.n, gotS.err = recvStream(p.server) }()
	go func() { defer wg.Done(); gotC.sum, gotC.n, gotC.err = recvStream(p.client) }()
	wg.Wait()
	for _, r := range []res{sentC, sentS, gotS, gotC} {
		if r.err != nil {
			return r.err
		}
	}
	// The hashes cover the whole stream, read-ahead included.
	wantS := hashOf(pattern[id:id+int(raC)], c2s-raC, id+int(raC))
	wantC := hashOf(pattern[id+1:id+1+int(raS)], s2c-raS, id+1+int(raS))
	if gotS.n != c2s || gotS.sum != wantS {
		return fmt.Errorf("client->server: got %d bytes (hash %x), want %d (hash %x)", gotS.n, gotS.sum, c2s, wantS)
	}
	if gotC.n != s2c || gotC.sum != wantC {
		return fmt.Errorf("server->client: got %d bytes (hash %x), want %d (hash %x)", gotC.n, gotC.sum, s2c, wantC)
	}
	st := waitDone(t, done)
	if st.ClientToServer != uint64(c2s) || st.ServerToClient != uint64(s2c) {
		return fmt.Errorf("stats %+v, want %d/%d", st, c2s, s2c)
	}
	if st.Reason != "client closed" && st.Reason != "server closed" {
		return fmt.Errorf("reason %q", st.Reason)
	}
	return nil
}

// hashOf is the hash of prefix followed by n pattern bytes from off.
func hashOf(prefix []byte, n int64, off int) uint64 {
	var h maphash.Hash
	h.SetSeed(hashSeed)
	h.Write(prefix)
	off %= len(pattern)
	for n > 0 {
		chunk := pattern[off:min(len(pattern), off+int(min(n, 1<<30)))]
		h.Write(chunk)
		n -= int64(len(chunk))
		off = (off + len(chunk)) % len(pattern)
	}
	return h.Sum64()
}

// runTransfers runs count sessions, at most conc at a time, with sizes
// drawn log-uniformly from 1 byte to maxSize in each direction.
func runTransfers(t *testing.T, opts Options, count, conc int, maxSize int64, seed uint64) {
	sp := needSplicer(t, opts)
	h := newHarness(t)
	fds0 := openFDs(t)
	r := rand.New(rand.NewPCG(seed, 0))
	sizes := make([][2]int64, count)
	var total int64
	for i := range sizes {
		sizes[i] = [2]int64{logUniform(r, maxSize), logUniform(r, maxSize)}
		total += sizes[i][0] + sizes[i][1]
	}
	t.Logf("%d sessions, %d at a time, %.2f GB in total (seed %d)", count, conc, float64(total)/1e9, seed)
	var finished atomic.Int64
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		last := int64(-1)
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Second):
			}
			if n := finished.Load(); n == last {
				t.Logf("no session finished in 10s; state:\n%s", sp.dump())
			} else {
				last = n
			}
		}
	}()
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures int
	for i, sz := range sizes {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done(); finished.Add(1) }()
			if err := transfer(t, sp, h, i, sz[0], sz[1]); err != nil {
				mu.Lock()
				failures++
				if failures <= 10 {
					t.Errorf("session %d (%d/%d bytes): %v", i, sz[0], sz[1], err)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	checkEnded(t, sp, fds0)
}

// transferBacklog is the backlog bound of the transfer tests: above the
// largest message, so that no healthy session can reach it and the test
// checks the data path alone (TestStalledReader checks the bound).
const transferBacklog = 128 << 20

// TestTransferExact: 1,000 sessions (PGMFA_SPLICE_SESSIONS), 32 at a time,
// 1 B to 64 MiB each way drawn log-uniformly, byte-exact.
func TestTransferExact(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-GB transfer; skipped with -short")
	}
	mb := int64(transferBacklog)
	if v := os.Getenv("PGMFA_SPLICE_MAXBACKLOG"); v != "" {
		mb, _ = strconv.ParseInt(v, 10, 64)
	}
	runTransfers(t, Options{MaxBacklog: mb}, sessionsFromEnv(t, 1000), 32, 64<<20, 1)
}
