package bpf

import (
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// soak reports whether the long versions of the flow-control tests run
// (PGMFA_SOAK=1): more sessions, more runs, larger streams.
func soak() bool { return os.Getenv("PGMFA_SOAK") == "1" }

// envInt reads a positive integer from the environment, or def.
func envInt(t *testing.T, name string, def int) int {
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("%s=%q: want a positive integer", name, v)
		}
		return n
	}
	return def
}

// held is what the kernel holds of one direction outside both sockets'
// buffers, by the program's own accounting and the destination's send
// progress: the redirect queue. Only meaningful for a TCP destination.
func (s *Splicer) held(t *testing.T, ss *session, d *direction) int64 {
	v, err := s.dirState(ss, d)
	if err != nil {
		t.Fatal(err)
	}
	p, err := writeProgress(ss.fds[d.dst])
	if err != nil {
		return -1
	}
	return int64(v.Redirected) - int64(p-d.base-d.uwrite)
}

// TestStalledReaders: 100 sessions (PGMFA_STALL_SESSIONS) whose servers
// stream to clients that read nothing. Flow control must stop every server
// with the redirect queue of each session within the threshold plus one
// skb (the program's own accounting), keep the machine's memory within
// the sockets' own buffers, end no session, and then deliver every byte,
// exactly, once the clients read.
func TestStalledReaders(t *testing.T) {
	if testing.Short() {
		t.Skip("GB streams; skipped with -short")
	}
	const threshold = DefaultFlowThreshold
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	n := envInt(t, "PGMFA_STALL_SESSIONS", 100)
	total := int64(256 << 20) // per session; the servers are stopped long before
	if soak() || os.Getenv("PGMFA_STALL_BYTES") != "" {
		total = stallBytes(t)
	}
	fds0 := openFDs(t)
	before := sampleKernelMem(t)
	type sess struct {
		p       *pair
		done    <-chan Stats
		written atomic.Int64
		wdone   chan struct{}
	}
	all := make([]*sess, n)
	var written atomic.Int64
	for i := range all {
		s := &sess{p: h.pair(), wdone: make(chan struct{})}
		var onDone func(Stats)
		onDone, s.done = doneChan(t)
		if err := sp.Splice(s.p.pc, s.p.ps, nil, nil, onDone); err != nil {
			t.Fatal(err)
		}
		go func() {
			defer close(s.wdone)
			off := i * 7919
			for s.written.Load() < total {
				chunk := pattern[off%len(pattern):][:min(256<<10, len(pattern)-off%len(pattern))]
				chunk = chunk[:min(int64(len(chunk)), total-s.written.Load())]
				w, err := s.p.server.Write(chunk)
				s.written.Add(int64(w))
				written.Add(int64(w))
				off += w
				if err != nil {
					return
				}
			}
			s.p.server.(*net.TCPConn).CloseWrite()
		}()
		all[i] = s
	}
	allDone := make(chan struct{})
	waitQuiet(&written, allDone)
	stalled := sampleKernelMem(t)
	t.Logf("%d sessions, servers stopped after %.1f MiB each on average (stream %d MiB)", n, float64(written.Load())/float64(n)/(1<<20), total>>20)
	t.Logf("kernel before: %v", before)
	t.Logf("kernel stalled: %v", stalled)
	perSession := (before.availKB - stalled.availKB) * 1024 / int64(n)
	t.Logf("memory per stalled session: %.1f MiB (sockets' buffers included)", float64(perSession)/(1<<20))
	// Every byte the kernel holds of a session is in one of four socket
	// buffers (the client's receive buffer, the proxy's client socket's
	// send buffer, the proxy's server socket's receive buffer holding the
	// passed bytes, the server's send buffer) or the redirect queue: the
	// servers must have been stopped within those, far from the end.
	var maxHeld int64
	live := sp.snapshot()
	if len(live) != n {
		t.Fatalf("%d sessions live, want %d (flow control must end none)", len(live), n)
	}
	// The watcher owns the sessions; reading its counters from here is a
	// diagnostic race on plain fields that only grow, acceptable in a test.
	for _, ss := range live {
		maxHeld = max(maxHeld, sp.held(t, ss, ss.dirs[sideServer]))
	}
	t.Logf("largest redirect queue of a stalled session: %d bytes (threshold %d)", maxHeld, threshold)
	if maxHeld > threshold+overSlack {
		t.Errorf("a stalled session's redirect queue holds %d bytes, above the threshold %d + one skb", maxHeld, threshold)
	}
	for i, s := range all {
		if w := s.written.Load(); w >= total || w > 64<<20 {
			t.Errorf("session %d: the server wrote %d bytes to a client that reads nothing", i, w)
		}
	}
	const memBound = 64 << 20 // generous: five socket buffers of a few MiB, the queue, slab
	if perSession > memBound {
		t.Errorf("%.1f MiB of memory per stalled session, want under %d MiB", float64(perSession)/(1<<20), memBound>>20)
	}
	// Now every client reads its whole stream.
	var wg sync.WaitGroup
	for i, s := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.p.client.SetReadDeadline(time.Now().Add(5 * time.Minute))
			m, rerr := recvCompare(s.p.client, total, i*7919)
			if rerr != nil {
				io.Copy(io.Discard, s.p.client)
				st := waitDone(t, s.done)
				t.Errorf("session %d: %d of %d bytes: %v; redirected %d, relayed %d; audit: %q", i, m, total, rerr, st.ServerToClient-st.Relayed, st.Relayed, st.Anomaly)
				s.p.close()
				return
			}
			s.p.client.(*net.TCPConn).CloseWrite()
			var st Stats
			select {
			case st = <-s.done:
			case <-time.After(2 * time.Minute):
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("session %d never ended; state:\n%s\ngoroutines:\n%s", i, sp.dump(), buf)
				return
			}
			if st.Reason != "server closed" && st.Reason != "client closed" || st.ServerToClient != uint64(total) || st.FlowControl == 0 {
				t.Errorf("session %d: stats %+v", i, st)
			}
			s.p.close()
		}()
	}
	wg.Wait()
	close(allDone)
	checkEnded(t, sp, fds0)
}

// jitter stalls and bursts a stream at random: chunks of 1 B to 256 KiB,
// and before some of them a pause between minPause and maxPause.
type jitter struct {
	mu                 sync.Mutex
	r                  *rand.Rand
	minPause, maxPause time.Duration
	oneIn              int // pause before one chunk in oneIn
}

func (j *jitter) next(max int) (int, time.Duration) {
	j.mu.Lock()
	defer j.mu.Unlock()
	n := 1 + int(logUniform(j.r, int64(max-1)))
	var d time.Duration
	if j.r.IntN(j.oneIn) == 0 {
		d = j.minPause + time.Duration(j.r.Int64N(int64(j.maxPause-j.minPause)))
	}
	return n, d
}

type jitterConn struct {
	net.Conn
	j *jitter
}

func (c jitterConn) Write(p []byte) (int, error) {
	total := 0
	for len(p) > 0 {
		n, pause := c.j.next(256 << 10)
		time.Sleep(pause)
		w, err := c.Conn.Write(p[:min(n, len(p))])
		total += w
		if err != nil {
			return total, err
		}
		p = p[w:]
	}
	return total, nil
}

func (c jitterConn) Read(p []byte) (int, error) {
	n, pause := c.j.next(len(p))
	time.Sleep(pause)
	return c.Conn.Read(p[:min(n, len(p))])
}

func (c jitterConn) CloseWrite() error { return c.Conn.(*net.TCPConn).CloseWrite() }

// stressRun runs count sessions, conc at a time: both apps send a stream
// (log-uniform, up to maxSize) and read the other, every one of the four
// stalling and bursting at random, and each stream must arrive exact.
func stressRun(t *testing.T, sp *Splicer, h *harness, seed uint64, count, conc int, maxSize int64) {
	r := rand.New(rand.NewPCG(seed, 11))
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i := range count {
		// 256 KiB to maxSize, log-uniform: long enough for stalls.
		c2s, s2c := logUniformIn(r, 256<<10, maxSize), logUniformIn(r, 256<<10, maxSize)
		// Every party runs at full speed between stalls of 20-250 ms, one
		// before a chunk in 64 (~1.3 MB): while a reader stalls, its
		// writer fills the kernel's queue past the threshold (an episode
		// starts); while the writer stalls and the reader runs, the relay
		// catches up and the next skb switches the direction back to the
		// kernel (it ends).
		js := [4]*jitter{}
		for k := range js {
			js[k] = &jitter{r: rand.New(rand.NewPCG(seed, uint64(i*4+k))), minPause: 20 * time.Millisecond, maxPause: 250 * time.Millisecond, oneIn: 64}
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := stressSession(t, sp, h, i, c2s, s2c, js); err != nil {
				if failed.Add(1) <= 10 {
					t.Errorf("seed %d session %d (%d/%d bytes): %v", seed, i, c2s, s2c, err)
				}
			}
		}()
	}
	wg.Wait()
}

func stressSession(t *testing.T, sp *Splicer, h *harness, id int, c2s, s2c int64, js [4]*jitter) error {
	p := h.pair()
	defer p.close()
	// Small receive buffers on the apps: a reader's pause then reaches
	// the kernel's queue within milliseconds instead of after the many
	// MiB autotuning would give it.
	p.client.(*net.TCPConn).SetReadBuffer(128 << 10)
	p.server.(*net.TCPConn).SetReadBuffer(128 << 10)
	onDone, done := doneChan(t)
	if err := sp.Splice(p.pc, p.ps, nil, nil, onDone); err != nil {
		return fmt.Errorf("splice: %w", err)
	}
	type res struct {
		sum uint64
		n   int64
		err error
	}
	var gotS, gotC res
	var sendErr [2]error
	var wg sync.WaitGroup
	wg.Add(4)
	go func() { defer wg.Done(); _, sendErr[0] = sendStream(jitterConn{p.client, js[0]}, c2s, id) }()
	go func() { defer wg.Done(); _, sendErr[1] = sendStream(jitterConn{p.server, js[1]}, s2c, id+1) }()
	go func() { defer wg.Done(); gotS.sum, gotS.n, gotS.err = recvStream(jitterConn{p.server, js[2]}) }()
	go func() { defer wg.Done(); gotC.sum, gotC.n, gotC.err = recvStream(jitterConn{p.client, js[3]}) }()
	wg.Wait()
	for _, err := range []error{sendErr[0], sendErr[1], gotS.err, gotC.err} {
		if err != nil {
			return err
		}
	}
	if want := hashOf(nil, c2s, id); gotS.n != c2s || gotS.sum != want {
		return fmt.Errorf("client->server: %d of %d bytes, hash %x want %x (lost, duplicated or reordered)", gotS.n, c2s, gotS.sum, want)
	}
	if want := hashOf(nil, s2c, id+1); gotC.n != s2c || gotC.sum != want {
		return fmt.Errorf("server->client: %d of %d bytes, hash %x want %x (lost, duplicated or reordered)", gotC.n, s2c, gotC.sum, want)
	}
	st := waitDone(t, done)
	if os.Getenv("PGMFA_STRESS_VERBOSE") != "" {
		t.Logf("session %d: %d/%d bytes, %d episodes, %d relayed, %v", id, c2s, s2c, st.FlowControl, st.Relayed, st.Duration)
	}
	if st.ClientToServer != uint64(c2s) || st.ServerToClient != uint64(s2c) || st.Anomaly != "" {
		return fmt.Errorf("stats %+v, want %d/%d", st, c2s, s2c)
	}
	return nil
}

// TestFlowControlStress: runs of 200 sessions (PGMFA_STRESS_SESSIONS), 32
// at a time, 256 KiB to 32 MiB each way, where all four parties stall and
// burst at random, so that flow control is entered and left hundreds of
// times per run; every byte must arrive once and in order, and the audit
// must find the kernel's counts equal to TCP's. Three runs in CI,
// alternating thresholds of 1 MiB and 256 KiB; PGMFA_SOAK=1 makes it 30
// runs (PGMFA_STRESS_RUNS overrides).
func TestFlowControlStress(t *testing.T) {
	if testing.Short() {
		t.Skip("GB transfers; skipped with -short")
	}
	runs := 3
	if soak() {
		runs = 30
	}
	runs = envInt(t, "PGMFA_STRESS_RUNS", runs)
	sessions := envInt(t, "PGMFA_STRESS_SESSIONS", 200)
	var allEpisodes uint64
	for run := range runs {
		// Small thresholds, so that every run enters flow control hundreds
		// of times; the default threshold is exercised by
		// TestStalledReaders and TestTransferExact (hundreds of episodes
		// per run too).
		threshold := int64(1 << 20)
		if run%2 == 1 {
			threshold = 256 << 10
		}
		ok := t.Run(fmt.Sprintf("run%d-threshold%dK", run, threshold>>10), func(t *testing.T) {
			sp := needSplicer(t, Options{FlowThreshold: threshold})
			h := newHarness(t)
			fds0 := openFDs(t)
			stressRun(t, sp, h, uint64(run+1), sessions, 32, 32<<20)
			ep, _ := sp.FlowControl()
			allEpisodes += ep
			checkEnded(t, sp, fds0)
			if sp.BacklogLimitEnds() != 0 {
				t.Errorf("%d sessions ended at the hard bound", sp.BacklogLimitEnds())
			}
			if ep < 100 {
				t.Errorf("only %d flow-control episodes: the run did not exercise the mechanism", ep)
			}
		})
		if !ok {
			break
		}
	}
	t.Logf("%d runs, %d flow-control episodes in all", runs, allEpisodes)
}

// TestHardBound: a client that keeps sending while it reads nothing, to a
// server that does the same, defeats flow control: the client's passed
// bytes queue in the kernel behind the server's bytes that the client
// does not read, charged to no socket, so TCP's window stays open. The
// hard bound (MaxBacklog) must end that session, and nothing may leak.
func TestHardBound(t *testing.T) {
	const maxBacklog = 16 << 20
	sp := needSplicer(t, Options{MaxBacklog: maxBacklog})
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	onDone, done := doneChan(t)
	if err := sp.Splice(p.pc, p.ps, nil, nil, onDone); err != nil {
		t.Fatal(err)
	}
	const total = 2 << 30
	var sent [2]atomic.Int64
	for i, c := range []net.Conn{p.client, p.server} {
		go func() {
			for sent[i].Load() < total {
				w, err := c.Write(pattern[:1<<20])
				sent[i].Add(int64(w))
				if err != nil {
					return
				}
			}
		}()
	}
	var st Stats
	select {
	case st = <-done:
	case <-time.After(2 * time.Minute):
		t.Fatalf("not ended; client sent %d, server sent %d; state:\n%s", sent[0].Load(), sent[1].Load(), sp.dump())
	}
	t.Logf("ended: %+v; held at the bound %d; client sent %.1f MiB, server %.1f MiB", st, sp.lastOver.Load(),
		float64(sent[0].Load())/(1<<20), float64(sent[1].Load())/(1<<20))
	if st.Reason != ReasonBacklogLimit {
		t.Fatalf("reason %q, want %q", st.Reason, ReasonBacklogLimit)
	}
	if got := sp.lastOver.Load(); got > maxBacklog+overSlack {
		t.Errorf("held %d at the bound, want at most %d + one skb", got, maxBacklog)
	}
	// Both apps see the end.
	for _, c := range []net.Conn{p.client, p.server} {
		c.SetReadDeadline(time.Now().Add(time.Minute))
		io.Copy(io.Discard, c)
	}
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Errorf("%d map entries left (%v)", n, err)
	}
}

// recvCompare reads to EOF and compares what arrives with the n pattern
// bytes from off as it goes. On a difference it says where, and whether
// the bytes there replay earlier ones (a duplicate) or come from later (a
// gap), which a hash cannot tell.
func recvCompare(c net.Conn, n int64, off int) (int64, error) {
	buf := make([]byte, 256<<10)
	var got int64
	for {
		r, err := c.Read(buf)
		for k := 0; k < r; k++ {
			pos := got + int64(k)
			if pos >= n {
				return got + int64(r), fmt.Errorf("more bytes than sent: byte %d", pos)
			}
			if buf[k] != pattern[(int64(off)+pos)%int64(len(pattern))] {
				return got + int64(k), fmt.Errorf("first difference at byte %d: %s", pos, placeOf(buf[k:r], off, pos, n))
			}
		}
		got += int64(r)
		if err == io.EOF {
			if got != n {
				return got, fmt.Errorf("EOF after %d of %d bytes", got, n)
			}
			return got, nil
		}
		if err != nil {
			return got, err
		}
	}
}

// placeOf finds where in the stream the bytes b (received at position pos)
// came from, searching 64 MiB either side.
func placeOf(b []byte, off int, pos, n int64) string {
	probe := b[:min(len(b), 64)]
	if len(probe) < 16 {
		return "too few bytes to place"
	}
	for d := int64(1); d < 64<<20; d++ {
		for _, q := range []int64{pos - d, pos + d} {
			if q < 0 || q+int64(len(probe)) > n {
				continue
			}
			start := (int64(off) + q) % int64(len(pattern))
			if start+int64(len(probe)) <= int64(len(pattern)) && string(pattern[start:start+int64(len(probe))]) == string(probe) {
				if q < pos {
					return fmt.Sprintf("they replay the bytes from %d (a duplicate of %d bytes)", q, pos-q)
				}
				return fmt.Sprintf("they are the bytes from %d (a gap of %d bytes)", q, q-pos)
			}
		}
	}
	return "not found nearby"
}

// TestAuditCatchesMismatch: the end-of-session audit compares the
// program's counts with TCP's own; a count off by one skb must be reported
// (so a clean run of the stress tests means something).
func TestAuditCatchesMismatch(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	defer unix.Close(p.pc)
	defer unix.Close(p.ps)
	base, err := receiveBase(p.pc)
	if err != nil {
		t.Fatal(err)
	}
	unix.SetNonblock(p.pc, false)
	const n = 1 << 20
	go func() { p.client.Write(pattern[:n]); p.client.(*net.TCPConn).CloseWrite() }()
	buf := make([]byte, 64<<10)
	for got := 0; got < n; {
		r, err := unix.Read(p.pc, buf)
		if r <= 0 {
			t.Fatalf("read: %d %v", r, err)
		}
		got += r
	}
	// Wait for the FIN, which TCP counts as one more sequence number.
	for {
		if r, _ := unix.Read(p.pc, buf); r == 0 {
			break
		}
	}
	ss := &session{fds: [2]int{p.pc, p.ps}}
	ss.dirs[sideClient] = &direction{src: sideClient, dst: sideServer, rcvBase: base, fin: true}
	ss.dirs[sideServer] = &direction{src: sideServer, dst: sideClient, rcvBase: noBase}
	for _, c := range []struct {
		redirected, passed uint64
		bad                bool
	}{{n, 0, false}, {n - 65483, 65483, false}, {n, 65483, true}, {n - 1, 0, true}} {
		var st Stats
		before := sp.Anomalies()
		sp.audit(ss, [2]spliceDir{{Redirected: c.redirected, Passed: c.passed}}, &st)
		if got := sp.Anomalies() > before; got != c.bad || (st.Anomaly != "") != c.bad {
			t.Errorf("redirected %d passed %d: anomaly %v (%q), want %v", c.redirected, c.passed, got, st.Anomaly, c.bad)
		}
	}
}

// logUniformIn draws a size log-uniformly from [lo, hi].
func logUniformIn(r *rand.Rand, lo, hi int64) int64 {
	return int64(math.Exp(math.Log(float64(lo)) + r.Float64()*(math.Log(float64(hi))-math.Log(float64(lo)))))
}
