package bpf

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bpf/fdpass"
)

// unixConns returns two connected unix stream sockets.
func unixConns(t testing.TB) (a, b *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "handover")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

// sendUntil writes the pattern from off to c in 256 KiB chunks, paced, until
// stop is closed, then extra bytes more, then half-closes. It returns the
// bytes written.
func sendUntil(c net.Conn, off int, stop <-chan struct{}, extra int64, pace time.Duration) (int64, error) {
	var n int64
	left := int64(-1) // unknown until stop
	for left != 0 {
		if left < 0 {
			select {
			case <-stop:
				left = extra
				continue
			default:
			}
		}
		o := (off + int(n%int64(len(pattern)))) % len(pattern)
		chunk := pattern[o:min(len(pattern), o+256<<10)]
		if left >= 0 && int64(len(chunk)) > left {
			chunk = chunk[:left]
		}
		w, err := c.Write(chunk)
		n += int64(w)
		if left > 0 {
			left -= int64(w)
		}
		if err != nil {
			return n, err
		}
		time.Sleep(pace)
	}
	return n, c.(interface{ CloseWrite() error }).CloseWrite()
}

// recvCheck reads to EOF and compares every byte with the pattern from off
// as it goes (a hash could not say where a stream went wrong). got counts
// the bytes received.
func recvCheck(c net.Conn, off int, got *atomic.Int64) error {
	buf := make([]byte, 256<<10)
	for {
		r, err := c.Read(buf)
		pos := got.Load()
		for k := 0; k < r; k++ {
			if buf[k] != pattern[(int64(off)+pos+int64(k))%int64(len(pattern))] {
				return fmt.Errorf("first difference at byte %d: %s", pos+int64(k), placeOf(buf[k:r], off, pos+int64(k), 1<<40))
			}
		}
		got.Add(int64(r))
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// childReport is what TestHandOverChild tells its parent, one JSON line
// each: the end of an adopted session (by its meta), then a final report.
type childReport struct {
	Meta  string      `json:"meta,omitempty"`
	Stats *Stats      `json:"stats,omitempty"`
	Final *childFinal `json:"final,omitempty"`
	Error string      `json:"error,omitempty"`
}

type childFinal struct {
	Adopted, Sessions, MapEntries int
	Anomalies                     uint64
	NewSession                    string // the error of a session spliced after the adoption, or ""
}

const handOverChildEnv = "PGMFA_HANDOVER_CHILD"

// TestHandOverChild is the new process of TestHandOver: it adopts the
// sessions on fd 3, reports each one's end, then splices a session of its
// own with the adopted objects and reports what is left. It does nothing
// in a normal run.
func TestHandOverChild(t *testing.T) {
	if os.Getenv(handOverChildEnv) != "1" {
		t.Skip("only runs as TestHandOver's child")
	}
	f := os.NewFile(3, "handover")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	conn := c.(*net.UnixConn)
	// Ready: the parent hands over once the receiver is up, so that the
	// time the sessions go unwatched is the hand-over's own.
	if _, err := conn.Write([]byte("ready\n")); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	enc := json.NewEncoder(conn)
	report := func(r childReport) {
		mu.Lock()
		defer mu.Unlock()
		if err := enc.Encode(&r); err != nil {
			t.Errorf("reporting: %v", err)
		}
	}
	var adopted int
	var ended atomic.Int64
	allEnded := make(chan struct{})
	sp, err := Adopt(conn, Options{}, func(meta []byte, _ Live) func(Stats) {
		adopted++
		return func(st Stats) {
			report(childReport{Meta: string(meta), Stats: &st})
			if ended.Add(1) == int64(adopted) {
				close(allEnded)
			}
		}
	})
	if err != nil {
		report(childReport{Error: err.Error()})
		t.Fatal(err)
	}
	defer sp.Close()
	select {
	case <-allEnded:
	case <-time.After(5 * time.Minute):
		report(childReport{Error: "adopted sessions did not end:\n" + sp.dump()})
		t.Fatal("adopted sessions did not end")
	}
	// The adopted objects splice new sessions too: the program stayed
	// attached to the adopted verdict map.
	fin := &childFinal{Adopted: adopted}
	if err := transfer(t, sp, newHarness(t), 3, 4<<20, 4<<20); err != nil {
		fin.NewSession = err.Error()
	}
	fin.Sessions, fin.Anomalies = sp.Sessions(), sp.Anomalies()
	fin.MapEntries, err = sp.MapEntries()
	if err != nil {
		fin.MapEntries = -1
	}
	report(childReport{Final: fin})
}

// TestHandOver: sessions of every kind are handed over in the middle of
// their transfers to a Splicer in another process (this test binary,
// re-executed): bulk streams both ways, a server streaming to a client
// that reads with pauses (in and out of flow control), a server streaming
// to a client that reads nothing until after the hand-over (in flow
// control, with bytes the watcher read and could not write yet), and idle
// sessions that talk only afterwards. Every byte must arrive exactly once
// and in order; the sessions end in the new process with totals that count
// the bytes before the hand-over too; the old Splicer keeps nothing (fds,
// sessions) and calls no onDone; the new one leaves nothing behind.
func TestHandOver(t *testing.T) {
	h := newHarness(t)
	fds0 := openFDs(t)
	// A small threshold, so that the slow readers enter flow control.
	sp := needSplicer(t, Options{FlowThreshold: 256 << 10})
	n := envInt(t, "PGMFA_HANDOVER_SESSIONS", 24)
	const (
		bulk = iota
		slow
		stalled
		idle
		kinds
	)
	kindName := []string{"bulk", "slow", "stalled", "idle"}
	type sess struct {
		kind         int
		p            *pair
		offC, offS   int // pattern offsets of the two streams
		raC, raS     int // read-ahead bytes of each
		sentC, sentS int64
		gotC, gotS   atomic.Int64 // at the client (from the server), at the server
		errs         []error
		cookieS      uint64
	}
	handed := make(chan struct{}) // closed once HandOver returned
	all := make([]*sess, n)
	var wg sync.WaitGroup
	for i := range all {
		s := &sess{kind: i % kinds, p: h.pair(), offC: i * 7919, offS: i*7919 + 4099, raC: 1 + i%5, raS: 1 + i%3}
		s.cookieS = cookieMust(t, s.p.ps)
		all[i] = s
		toServer := pattern[s.offC : s.offC+s.raC]
		toClient := pattern[s.offS : s.offS+s.raS]
		if s.kind == stalled {
			// Small client buffer: the stall reaches the kernel's queue
			// (and flow control) quickly.
			s.p.client.(*net.TCPConn).SetReadBuffer(128 << 10)
		}
		err := sp.SpliceWithMeta(s.p.pc, s.p.ps, toServer, toClient, []byte(fmt.Sprint(i)), func(st Stats) {
			t.Errorf("session %d ended in the old process: %+v", i, st)
		})
		if err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		fail := func(err error) {
			if err != nil {
				mu.Lock()
				s.errs = append(s.errs, err)
				mu.Unlock()
			}
		}
		switch s.kind {
		case idle:
			wg.Add(2)
			// Nothing before the hand-over; then 20 exchanges, then the
			// ends close.
			go func() {
				defer wg.Done()
				<-handed
				r := rand.New(rand.NewPCG(uint64(i), 0))
				o := s.offC + s.raC
				buf := make([]byte, 8<<10)
				for range 20 {
					m := 1 + r.IntN(len(buf))
					if _, err := s.p.client.Write(pattern[o : o+m]); err != nil {
						fail(err)
						return
					}
					s.sentC += int64(m)
					if _, err := io.ReadFull(s.p.client, buf[:m]); err != nil {
						fail(fmt.Errorf("client: %w", err))
						return
					}
					s.gotC.Add(int64(m))
					if !bytes.Equal(buf[:m], pattern[o:o+m]) {
						fail(errors.New("the echo differs"))
					}
					o += m
				}
				fail(s.p.client.(*net.TCPConn).CloseWrite())
			}()
			go func() {
				// The server first takes the read-ahead, then echoes.
				defer wg.Done()
				ra := make([]byte, s.raC)
				if _, err := io.ReadFull(s.p.server, ra); err != nil || !bytes.Equal(ra, pattern[s.offC:s.offC+s.raC]) {
					fail(fmt.Errorf("server read-ahead: %q %v", ra, err))
					return
				}
				s.gotS.Add(int64(s.raC))
				buf := make([]byte, 8<<10)
				for {
					m, err := s.p.server.Read(buf)
					s.gotS.Add(int64(m))
					if m > 0 {
						if _, werr := s.p.server.Write(buf[:m]); werr != nil {
							fail(werr)
							return
						}
						s.sentS += int64(m)
					}
					if err == io.EOF {
						fail(s.p.server.(*net.TCPConn).CloseWrite())
						return
					}
					if err != nil {
						fail(err)
						return
					}
				}
			}()
			continue
		}
		wg.Add(4)
		pace := 2 * time.Millisecond
		go func() {
			defer wg.Done()
			var err error
			extra := int64(4 << 20)
			if s.kind != bulk {
				extra = 1 << 20
			}
			if s.kind == stalled {
				// A client that sends while it reads nothing defeats flow
				// control (TestHardBound): this one sends afterwards.
				<-handed
			}
			s.sentC, err = sendUntil(s.p.client, s.offC+s.raC, handed, extra, pace)
			fail(err)
		}()
		go func() {
			defer wg.Done()
			var err error
			extra := int64(8 << 20)
			if s.kind == slow {
				extra = 1 << 20
			}
			s.sentS, err = sendUntil(s.p.server, s.offS+s.raS, handed, extra, pace/2)
			fail(err)
		}()
		go func() { defer wg.Done(); fail(recvCheck(s.p.server, s.offC, &s.gotS)) }()
		go func() {
			defer wg.Done()
			c := net.Conn(s.p.client)
			switch s.kind {
			case stalled:
				<-handed
			case slow:
				c = jitterConn{c, &jitter{r: rand.New(rand.NewPCG(uint64(i), 1)), minPause: 20 * time.Millisecond, maxPause: 100 * time.Millisecond, oneIn: 32}}
			}
			fail(recvCheck(c, s.offS, &s.gotC))
		}()
	}
	// The idle sessions' clients read their read-ahead before anything.
	for _, s := range all {
		if s.kind == idle {
			ra := make([]byte, s.raS)
			if _, err := io.ReadFull(s.p.client, ra); err != nil || !bytes.Equal(ra, pattern[s.offS:s.offS+s.raS]) {
				t.Fatalf("idle client read-ahead: %q %v", ra, err)
			}
			s.gotC.Add(int64(s.raS))
		}
	}

	// Hand over in the middle: every stream is moving, every stalled
	// session is in flow control.
	t0 := time.Now()
	deadline := t0.Add(2 * time.Minute)
	for {
		ready := true
		for _, s := range all {
			switch s.kind {
			case bulk, slow:
				ready = ready && s.gotC.Load() > 1<<20 && s.gotS.Load() > 1<<20
			case stalled:
				var v spliceDir
				ready = ready && sp.obj.Dirs.Lookup(s.cookieS, &v) == nil && v.Flags&dirPass != 0
			}
		}
		if ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the transfers did not get going; state:\n%s", sp.dump())
		}
		time.Sleep(10 * time.Millisecond)
	}
	old, child := unixConns(t)
	cf, err := child.File()
	if err != nil {
		t.Fatal(err)
	}
	child.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHandOverChild$", "-test.count=1", "-test.v", "-test.timeout=10m")
	cmd.Env = append(os.Environ(), handOverChildEnv+"=1")
	cmd.ExtraFiles = []*os.File{cf}
	var childOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &childOut, &childOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	cf.Close()
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
		case <-time.After(time.Minute):
			cmd.Process.Kill()
		}
	})

	ready := make([]byte, 6)
	old.SetReadDeadline(time.Now().Add(2 * time.Minute))
	if _, err := io.ReadFull(old, ready); err != nil || string(ready) != "ready\n" {
		t.Fatalf("the child did not start: %q %v\n%s", ready, err, childOut.String())
	}
	old.SetReadDeadline(time.Time{})
	t1 := time.Now()
	rep, err := sp.HandOver(old)
	close(handed)
	t.Logf("transfers going after %v; HandOver took %v", t1.Sub(t0).Round(time.Millisecond), time.Since(t1).Round(time.Millisecond))
	if err != nil {
		t.Fatalf("HandOver: %v\nchild:\n%s", err, childOut.String())
	}
	t.Logf("handed over %d sessions, %d directions under flow control holding %d bytes read and not yet written; the watcher was parked for %v",
		rep.Sessions, rep.Relaying, rep.Held, rep.Parked)
	if rep.Sessions != n {
		t.Errorf("handed over %d sessions, want %d", rep.Sessions, n)
	}
	if rep.Relaying < n/kinds || rep.Held == 0 {
		t.Errorf("%d directions under flow control holding %d bytes at the hand-over: the stalled sessions' were not exercised", rep.Relaying, rep.Held)
	}
	if k := sp.Sessions(); k != 0 {
		t.Errorf("the old Splicer still has %d sessions", k)
	}
	if err := sp.Close(); err != nil {
		t.Errorf("Close after HandOver: %v", err)
	}
	if _, err := sp.HandOver(old); !errors.Is(err, ErrClosed) {
		t.Errorf("a second HandOver: %v, want ErrClosed", err)
	}
	if err := sp.Splice(-1, -1, nil, nil, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Splice after HandOver: %v, want ErrClosed", err)
	}

	// The streams finish through the new process.
	appsDone := make(chan struct{})
	go func() { wg.Wait(); close(appsDone) }()
	select {
	case <-appsDone:
	case <-time.After(5 * time.Minute):
		t.Fatalf("the transfers did not finish after the hand-over\nchild:\n%s", childOut.String())
	}
	t.Logf("transfers finished %v after the hand-over", time.Since(t1).Round(time.Millisecond))
	for i, s := range all {
		for _, err := range s.errs {
			t.Errorf("session %d (%s): %v", i, kindName[s.kind], err)
		}
		wantC, wantS := int64(s.raC)+s.sentC, int64(s.raS)+s.sentS
		if s.gotS.Load() != wantC || s.gotC.Load() != wantS {
			t.Errorf("session %d (%s): the server got %d of %d bytes, the client %d of %d", i, kindName[s.kind], s.gotS.Load(), wantC, s.gotC.Load(), wantS)
		}
	}

	// The new process's account of each session.
	seen := make([]bool, n)
	sc := bufio.NewScanner(old)
	sc.Buffer(nil, 1<<20)
	old.SetReadDeadline(time.Now().Add(5 * time.Minute))
	var fin *childFinal
	for fin == nil && sc.Scan() {
		var r childReport
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("child report %q: %v", sc.Text(), err)
		}
		switch {
		case r.Error != "":
			t.Fatalf("child: %s\n%s", r.Error, childOut.String())
		case r.Final != nil:
			fin = r.Final
		case r.Stats != nil:
			var i int
			if _, err := fmt.Sscan(r.Meta, &i); err != nil || i < 0 || i >= n || seen[i] {
				t.Errorf("a report for meta %q", r.Meta)
				continue
			}
			seen[i] = true
			s, st := all[i], r.Stats
			wantC, wantS := uint64(s.raC)+uint64(s.sentC), uint64(s.raS)+uint64(s.sentS)
			if st.ClientToServer != wantC || st.ServerToClient != wantS || st.Anomaly != "" ||
				st.Reason != "client closed" && st.Reason != "server closed" {
				t.Errorf("session %d (%s): stats %+v, want %d/%d bytes and a clean end", i, kindName[s.kind], *st, wantC, wantS)
			}
			if s.kind == stalled && (st.FlowControl == 0 || st.Relayed == 0) {
				t.Errorf("session %d (stalled): stats %+v, want flow control counted across the hand-over", i, *st)
			}
		}
	}
	if fin == nil {
		t.Fatalf("no final report from the child (%v)\n%s", sc.Err(), childOut.String())
	}
	for i, ok := range seen {
		if !ok {
			t.Errorf("session %d (%s): no end reported by the new process", i, kindName[all[i].kind])
		}
	}
	t.Logf("new process: %+v", *fin)
	if fin.Adopted != n || fin.Sessions != 0 || fin.MapEntries != 0 || fin.Anomalies != 0 || fin.NewSession != "" {
		t.Errorf("new process: %+v, want %d adopted and nothing left", *fin, n)
	}
	select {
	case <-exited:
		if waitErr != nil {
			t.Errorf("child: %v\n%s", waitErr, childOut.String())
		}
	case <-time.After(2 * time.Minute):
		t.Errorf("the child did not exit\n%s", childOut.String())
	}
	old.Close()
	for _, s := range all {
		s.p.close()
	}
	if k := openFDs(t); k != fds0 {
		t.Errorf("open fds: %d before, %d after (the old process must keep no reference)", fds0, k)
	}
}

// encodeFrame builds a frame as writeFrame sends it (without fds).
func encodeFrame(kind byte, nfds int, payload []byte) []byte {
	b := make([]byte, frameHeaderLen, frameHeaderLen+len(payload))
	binary.BigEndian.PutUint32(b, uint32(len(payload)))
	binary.BigEndian.PutUint16(b[4:], uint16(nfds))
	b[6] = kind
	return append(b, payload...)
}

func preambleOf(version uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte(handOverMagic), version)
}

// TestAdoptBadInput: Adopt on a socket that does not carry a pgmfa
// hand-over of this version and program fails with an error that says
// what it got, closes every fd that came with it, and disturbs nothing:
// a live Splicer whose real objects were passed in a hand-over Adopt
// refused still splices (the program stays attached).
func TestAdoptBadInput(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	names, objFDs := sp.obj.handed()
	hdr := func(program string, objects []string) []byte {
		b, _ := json.Marshal(&handOverHeader{Program: program, Objects: objects, Sessions: 1})
		return b
	}
	pipe := func() []int {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		return p[:]
	}
	p := h.pair() // its proxy fds only serve as sockets with the wrong cookies
	defer p.close()
	defer unix.Close(p.pc)
	defer unix.Close(p.ps)
	wrongCookies, _ := json.Marshal([]handOverSession{{Cookies: [2]uint64{1, 2}}})
	for _, c := range []struct {
		name string
		send func(conn *net.UnixConn)
		want string
	}{
		{"http", func(c *net.UnixConn) { c.Write([]byte("GET / HTTP/1.1\r\nHost: pgmfa\r\n\r\n")) }, `not a pgmfa hand-over: it starts with "GET`},
		{"nothing", func(c *net.UnixConn) {}, "not a pgmfa hand-over: the peer closed without sending anything"},
		{"short", func(c *net.UnixConn) { c.Write([]byte("pgmf")) }, `not a pgmfa hand-over: the peer closed after "pgmf"`},
		{"version", func(c *net.UnixConn) { c.Write(preambleOf(99)) }, "a pgmfa hand-over of version 99; this pgmfa speaks version 1"},
		{"huge frame", func(c *net.UnixConn) {
			c.Write(append(preambleOf(1), 0xff, 0xff, 0xff, 0xff, 0, 0, frameHeader, 0))
		}, "a frame of"},
		{"garbage json", func(c *net.UnixConn) {
			c.Write(append(preambleOf(1), encodeFrame(frameHeader, 0, []byte("{\"program\":"))...))
		}, "the hand-over's header"},
		{"other program", func(c *net.UnixConn) {
			fds := pipe()
			c.Write(preambleOf(1))
			writeFrame(c, frameHeader, hdr("0123", []string{"a", "b"}), fds)
			fdpass.CloseAll(fds)
		}, "the sender runs another BPF program"},
		{"wrong objects", func(c *net.UnixConn) {
			fds := pipe()
			c.Write(preambleOf(1))
			writeFrame(c, frameHeader, hdr(objectHash(), []string{"a", "b"}), fds)
			fdpass.CloseAll(fds)
		}, "the hand-over carries the objects [a b]"},
		{"fds that are not maps", func(c *net.UnixConn) {
			var fds []int
			for len(fds) < len(names) {
				fds = append(fds, pipe()...)
			}
			c.Write(preambleOf(1))
			writeFrame(c, frameHeader, hdr(objectHash(), names), fds[:len(names)])
			fdpass.CloseAll(fds)
		}, "is not a BPF map"},
		{"wrong cookies", func(c *net.UnixConn) {
			c.Write(preambleOf(1))
			writeFrame(c, frameHeader, hdr(objectHash(), names), objFDs)
			writeFrame(c, frameSessions, wrongCookies, []int{p.pc, p.ps})
		}, "the hand-over announced 1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			fds0 := openFDs(t)
			a, b := unixConns(t)
			sent := make(chan struct{})
			go func() {
				defer close(sent)
				c.send(a)
				a.CloseWrite()
			}()
			s, err := Adopt(b, Options{}, nil)
			if err == nil {
				s.Close()
				t.Fatal("Adopt accepted it")
			}
			t.Logf("%v", err)
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q, want it to say %q", err, c.want)
			}
			// The refusal reaches the sender.
			a.SetReadDeadline(time.Now().Add(time.Minute))
			r := newFrameReader(a)
			if kind, payload, _, err := r.frame(0); err != nil || kind != frameRefuse || !strings.Contains(string(payload), c.want[:10]) {
				t.Errorf("the sender read kind %d %q (%v), want a refusal", kind, payload, err)
			}
			// The sender closes its own copies of the fds it sent after
			// the send; Adopt may have refused before that.
			<-sent
			a.Close()
			b.Close()
			if k := openFDs(t); k != fds0 {
				t.Errorf("open fds: %d before, %d after", fds0, k)
			}
		})
	}
	// The Splicer whose objects went into a refused hand-over still works.
	if err := transfer(t, sp, h, 5, 1<<20, 1<<20); err != nil {
		t.Errorf("a transfer after the refused hand-overs: %v", err)
	}
}

// TestHandOverFailsSafe: a hand-over that does not complete (a receiver
// that is not a pgmfa and closes, one that refuses, one that never
// answers) returns an error that says so and leaves the Splicer running
// every session as before: transfers that were under way when it started
// finish byte-exact, through the same Splicer, with their full totals.
func TestHandOverFailsSafe(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	fds0 := openFDs(t)
	const n = 4
	type sess struct {
		p            *pair
		done         <-chan Stats
		sentC, sentS int64
		gotC, gotS   atomic.Int64
		errs         [4]error
	}
	stop := make(chan struct{})
	all := make([]*sess, n)
	var wg sync.WaitGroup
	for i := range all {
		s := &sess{p: h.pair()}
		all[i] = s
		var onDone func(Stats)
		onDone, s.done = doneChan(t)
		if err := sp.Splice(s.p.pc, s.p.ps, nil, nil, onDone); err != nil {
			t.Fatal(err)
		}
		wg.Add(4)
		go func() {
			defer wg.Done()
			s.sentC, s.errs[0] = sendUntil(s.p.client, i, stop, 1<<20, 2*time.Millisecond)
		}()
		go func() {
			defer wg.Done()
			s.sentS, s.errs[1] = sendUntil(s.p.server, i+1, stop, 1<<20, 2*time.Millisecond)
		}()
		go func() { defer wg.Done(); s.errs[2] = recvCheck(s.p.server, i, &s.gotS) }()
		go func() { defer wg.Done(); s.errs[3] = recvCheck(s.p.client, i+1, &s.gotC) }()
	}
	defer func(d time.Duration) { handOverTimeout = d }(handOverTimeout)
	handOverTimeout = 2 * time.Second
	for _, c := range []struct {
		name string
		peer func(*net.UnixConn)
		want string
	}{
		// Its close meets the sender writing (EPIPE) or waiting (ECONNRESET).
		{"closes", func(c *net.UnixConn) { io.Copy(io.Discard, io.LimitReader(c, 100)); c.Close() }, "unix"},
		{"refuses", func(c *net.UnixConn) {
			io.ReadFull(c, make([]byte, 12))
			b, _ := json.Marshal(&handOverCount{Error: "a test says no"})
			writeFrame(c, frameRefuse, b, nil)
			io.Copy(io.Discard, c)
		}, "the receiver refused: a test says no"},
		{"silent", func(c *net.UnixConn) { io.Copy(io.Discard, c) }, "i/o timeout"},
	} {
		a, b := unixConns(t)
		go c.peer(b)
		rep, err := sp.HandOver(a)
		a.Close()
		b.Close()
		t.Logf("%s: %v (%+v)", c.name, err, rep)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "the sessions stay here") {
			t.Errorf("%s: HandOver error %v, want it to say %q and that the sessions stay", c.name, err, c.want)
		}
		if k := sp.Sessions(); k != n {
			t.Errorf("%s: %d sessions after the failed hand-over, want %d", c.name, k, n)
		}
	}
	close(stop)
	wg.Wait()
	for i, s := range all {
		for _, err := range s.errs {
			if err != nil {
				t.Errorf("session %d: %v", i, err)
			}
		}
		if s.gotS.Load() != s.sentC || s.gotC.Load() != s.sentS {
			t.Errorf("session %d: the server got %d of %d bytes, the client %d of %d", i, s.gotS.Load(), s.sentC, s.gotC.Load(), s.sentS)
		}
		st := waitDone(t, s.done)
		if st.ClientToServer != uint64(s.sentC) || st.ServerToClient != uint64(s.sentS) {
			t.Errorf("session %d: stats %+v, want %d/%d", i, st, s.sentC, s.sentS)
		}
		s.p.close()
	}
	checkEnded(t, sp, fds0)
}

// FuzzReceiveHandOver: the receiver's parser, on any byte stream (without
// fds), neither panics nor accepts one that does not start with the
// magic and this version.
func FuzzReceiveHandOver(f *testing.F) {
	hdr, _ := json.Marshal(&handOverHeader{Program: objectHash(), Objects: []string{"targets"}, Sessions: 1})
	sess, _ := json.Marshal([]handOverSession{{Cookies: [2]uint64{1, 2}, Dirs: [2]handOverDir{{Relaying: true, Out: []byte("held")}}}})
	end, _ := json.Marshal(&handOverCount{Sessions: 1})
	valid := append(preambleOf(1), encodeFrame(frameHeader, 0, hdr)...)
	valid = append(valid, encodeFrame(frameSessions, 0, sess)...)
	valid = append(valid, encodeFrame(frameEnd, 0, end)...)
	f.Add(valid)
	f.Add(preambleOf(2))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add(append(preambleOf(1), encodeFrame(frameAbort, 0, nil)...))
	f.Fuzz(func(t *testing.T, in []byte) {
		rest := in
		r := &frameReader{recv: func(p, oob []byte) (int, int, int, error) {
			// Short reads, to exercise reassembly.
			k := copy(p, rest[:min(len(rest), 1+len(rest)%7)])
			rest = rest[k:]
			if k == 0 {
				return 0, 0, 0, io.EOF
			}
			return k, 0, 0, nil
		}, tmp: make([]byte, 64)}
		err := receiveHandOver(r,
			func(*handOverHeader, []int) error { return nil },
			func(h *handOverSession, fds [2]int) error {
				for _, d := range h.Dirs {
					if len(d.Out) > relayBufSize {
						return errors.New("too much held")
					}
				}
				return nil
			})
		if err == nil && !bytes.HasPrefix(in, preambleOf(handOverVersion)) {
			t.Fatalf("accepted %q", in)
		}
	})
}

// TestHandOverChain: sessions whose four parties all stall and burst at
// random (as in TestFlowControlStress, so directions enter and leave flow
// control all the time and some end while it happens) are handed over
// from Splicer to Splicer (in this process, over socketpairs) again and
// again, at whatever point each one is, while new sessions keep being
// spliced into whichever Splicer is current. Every stream must arrive
// exactly, every session end once, in the Splicer that has it then, with
// its totals since its splice; nothing may be left behind.
func TestHandOverChain(t *testing.T) {
	h := newHarness(t)
	fds0 := openFDs(t)
	opts := Options{FlowThreshold: 256 << 10}
	cur := needSplicer(t, opts)
	n := envInt(t, "PGMFA_HANDOVER_CHAIN_SESSIONS", 32)
	hops := envInt(t, "PGMFA_HANDOVER_HOPS", 8)
	dones := make([]chan Stats, n)
	for i := range dones {
		dones[i] = make(chan Stats, 2)
	}
	onDone := func(meta []byte, _ Live) func(Stats) {
		var i int
		if _, err := fmt.Sscan(string(meta), &i); err != nil || i < 0 || i >= n {
			t.Errorf("adopted a session with meta %q", meta)
			return nil
		}
		return func(st Stats) { dones[i] <- st }
	}
	var mu sync.Mutex // cur, splicers
	splicers := []*Splicer{cur}
	current := func() *Splicer { mu.Lock(); defer mu.Unlock(); return cur }
	sizes := rand.New(rand.NewPCG(7, 7)) // start's, one goroutine at a time
	pauses := rand.New(rand.NewPCG(7, 8))
	var wg sync.WaitGroup
	var failed atomic.Int64
	start := func(i int) {
		c2s, s2c := logUniformIn(sizes, 256<<10, 16<<20), logUniformIn(sizes, 256<<10, 16<<20)
		js := [4]*jitter{}
		for k := range js {
			js[k] = &jitter{r: rand.New(rand.NewPCG(uint64(i), uint64(k))), minPause: 20 * time.Millisecond, maxPause: 250 * time.Millisecond, oneIn: 64}
		}
		p := h.pair()
		p.client.(*net.TCPConn).SetReadBuffer(128 << 10)
		p.server.(*net.TCPConn).SetReadBuffer(128 << 10)
		for {
			err := current().SpliceWithMeta(p.pc, p.ps, nil, nil, []byte(fmt.Sprint(i)), onDone([]byte(fmt.Sprint(i)), Live{}))
			if errors.Is(err, ErrHandingOver) || errors.Is(err, ErrClosed) {
				time.Sleep(time.Millisecond) // the next Splicer is about to take over
				continue
			}
			if err != nil {
				t.Errorf("session %d: %v", i, err)
				p.close()
				return
			}
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer p.close()
			fail := func(format string, a ...any) {
				if failed.Add(1) <= 10 {
					t.Errorf("session %d (%d/%d bytes): %s", i, c2s, s2c, fmt.Sprintf(format, a...))
				}
			}
			var gotS, gotC struct {
				sum uint64
				n   int64
				err error
			}
			var sendErr [2]error
			var w sync.WaitGroup
			w.Add(4)
			go func() { defer w.Done(); _, sendErr[0] = sendStream(jitterConn{p.client, js[0]}, c2s, i) }()
			go func() { defer w.Done(); _, sendErr[1] = sendStream(jitterConn{p.server, js[1]}, s2c, i+1) }()
			go func() { defer w.Done(); gotS.sum, gotS.n, gotS.err = recvStream(jitterConn{p.server, js[2]}) }()
			go func() { defer w.Done(); gotC.sum, gotC.n, gotC.err = recvStream(jitterConn{p.client, js[3]}) }()
			w.Wait()
			if err := errors.Join(sendErr[0], sendErr[1], gotS.err, gotC.err); err != nil {
				fail("%v", err)
				return
			}
			if want := hashOf(nil, c2s, i); gotS.n != c2s || gotS.sum != want {
				fail("client->server: %d of %d bytes, hash %x want %x (lost, duplicated or reordered)", gotS.n, c2s, gotS.sum, want)
			}
			if want := hashOf(nil, s2c, i+1); gotC.n != s2c || gotC.sum != want {
				fail("server->client: %d of %d bytes, hash %x want %x (lost, duplicated or reordered)", gotC.n, s2c, gotC.sum, want)
			}
			st := waitDone(t, dones[i])
			if st.ClientToServer != uint64(c2s) || st.ServerToClient != uint64(s2c) || st.Anomaly != "" ||
				st.Reason != "client closed" && st.Reason != "server closed" {
				fail("stats %+v", st)
			}
		}()
	}
	for i := range n / 2 {
		start(i)
	}
	var started sync.WaitGroup
	var relaying, held int
	for hop := range hops {
		if hop == 1 {
			started.Add(1)
			go func() {
				defer started.Done()
				for i := n / 2; i < n; i++ {
					start(i)
				}
			}()
		}
		time.Sleep(time.Duration(100+pauses.IntN(300)) * time.Millisecond)
		a, b := unixConns(t)
		type adopted struct {
			s   *Splicer
			err error
		}
		ch := make(chan adopted, 1)
		go func() { s, err := Adopt(b, opts, onDone); ch <- adopted{s, err} }()
		old := current()
		rep, err := old.HandOver(a)
		got := <-ch
		a.Close()
		b.Close()
		if err != nil || got.err != nil {
			t.Fatalf("hop %d: HandOver: %v; Adopt: %v", hop, err, got.err)
		}
		mu.Lock()
		cur = got.s
		splicers = append(splicers, cur)
		mu.Unlock()
		t.Logf("hop %d: %d sessions, %d directions under flow control holding %d bytes; parked %v", hop, rep.Sessions, rep.Relaying, rep.Held, rep.Parked.Round(time.Microsecond))
		relaying += rep.Relaying
		held += rep.Held
		if k := old.Sessions(); k != 0 {
			t.Errorf("hop %d: the old Splicer kept %d sessions", hop, k)
		}
	}
	started.Wait()
	wg.Wait()
	last := current()
	var episodes, anomalies uint64
	for _, s := range splicers {
		ep, _ := s.FlowControl()
		episodes += ep
		anomalies += s.Anomalies()
	}
	t.Logf("%d hops; %d directions were under flow control at a hand-over, with %d bytes held; %d flow-control episodes in all", hops, relaying, held, episodes)
	if anomalies != 0 {
		t.Errorf("%d sessions whose byte counts disagree with TCP's", anomalies)
	}
	if relaying == 0 {
		t.Errorf("no hand-over found a direction under flow control: the test did not exercise it")
	}
	if k := last.Sessions(); k != 0 {
		t.Errorf("%d sessions still live", k)
	}
	if k, err := last.MapEntries(); k != 0 || err != nil {
		t.Errorf("%d map entries left (%v)", k, err)
	}
	if err := last.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if k := openFDs(t); k != fds0 {
		t.Errorf("open fds: %d before, %d after", fds0, k)
	}
}

// TestHandOverMany: more sessions than one SCM_RIGHTS message carries (so
// they go in several frames), idle at the hand-over, each then exchanging
// a few bytes each way through the Splicer that adopted them; and a
// Splicer with no session hands over its objects alone.
func TestHandOverMany(t *testing.T) {
	h := newHarness(t)
	fds0 := openFDs(t)
	sp := needSplicer(t, Options{})
	n := envInt(t, "PGMFA_HANDOVER_MANY", 3*maxSessionsPerFrame+5)
	pairs := make([]*pair, n)
	dones := make([]chan Stats, n)
	for i := range pairs {
		pairs[i] = h.pair()
		dones[i] = make(chan Stats, 1)
		if err := sp.SpliceWithMeta(pairs[i].pc, pairs[i].ps, nil, nil, []byte(fmt.Sprint(i)), func(Stats) {
			t.Errorf("session %d ended in the old Splicer", i)
		}); err != nil {
			t.Fatal(err)
		}
	}
	onDone := func(meta []byte, _ Live) func(Stats) {
		var i int
		fmt.Sscan(string(meta), &i)
		return func(st Stats) { dones[i] <- st }
	}
	handOver := func(from *Splicer) *Splicer {
		a, b := unixConns(t)
		defer a.Close()
		defer b.Close()
		ch := make(chan error, 1)
		var to *Splicer
		go func() { var err error; to, err = Adopt(b, Options{}, onDone); ch <- err }()
		rep, err := from.HandOver(a)
		if aerr := <-ch; err != nil || aerr != nil {
			t.Fatalf("HandOver: %v; Adopt: %v", err, aerr)
		}
		t.Logf("handed over %d sessions, parked %v", rep.Sessions, rep.Parked.Round(time.Microsecond))
		return to
	}
	sp2 := handOver(sp)
	if k := sp2.Sessions(); k != n {
		t.Fatalf("adopted %d sessions, want %d", k, n)
	}
	var wg sync.WaitGroup
	for i, p := range pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := []byte(fmt.Sprintf("ping %d", i))
			p.client.Write(msg)
			p.client.(*net.TCPConn).CloseWrite()
			p.server.SetReadDeadline(time.Now().Add(2 * time.Minute))
			if got, err := io.ReadAll(p.server); err != nil || !bytes.Equal(got, msg) {
				t.Errorf("session %d: the server got %q (%v)", i, got, err)
			}
			p.server.Write(msg[1:])
			p.server.(*net.TCPConn).CloseWrite()
			p.client.SetReadDeadline(time.Now().Add(2 * time.Minute))
			if got, err := io.ReadAll(p.client); err != nil || !bytes.Equal(got, msg[1:]) {
				t.Errorf("session %d: the client got %q (%v)", i, got, err)
			}
			st := waitDone(t, dones[i])
			if st.ClientToServer != uint64(len(msg)) || st.ServerToClient != uint64(len(msg)-1) {
				t.Errorf("session %d: stats %+v", i, st)
			}
			p.close()
		}()
	}
	wg.Wait()
	// Nothing left to hand over but the objects: the third Splicer still
	// splices with them.
	sp3 := handOver(sp2)
	if err := transfer(t, sp3, h, 9, 1<<20, 1<<20); err != nil {
		t.Errorf("a transfer after an empty hand-over: %v", err)
	}
	if k, err := sp3.MapEntries(); k != 0 || err != nil {
		t.Errorf("%d map entries left (%v)", k, err)
	}
	sp3.Close()
	if k := openFDs(t); k != fds0 {
		t.Errorf("open fds: %d before, %d after", fds0, k)
	}
}

// relayHandOver forwards a hand-over from the sender's socket to the
// receiver's, frame by frame with their fds, up to the receiver's ack.
// Then, if gone, it passes the ack on, takes the sender's decision and
// closes the receiver's socket without passing it on (a sender that died
// after the ack); otherwise it tells the sender that the receiver
// refused, and passes the sender's abort on (a hand-over aborted after
// the receiver acknowledged it).
func relayHandOver(from, to *net.UnixConn, gone bool) error {
	fr, tr := newFrameReader(from), newFrameReader(to)
	defer fr.closeFDs()
	defer tr.closeFDs()
	if err := fr.preamble(); err != nil {
		return err
	}
	if _, err := to.Write(preambleOf(handOverVersion)); err != nil {
		return err
	}
	for {
		kind, payload, fds, err := fr.frame(-1)
		if err != nil {
			return err
		}
		err = writeFrame(to, kind, payload, fds)
		fdpass.CloseAll(fds)
		if err != nil {
			return err
		}
		if kind == frameEnd {
			break
		}
	}
	kind, payload, _, err := tr.frame(0)
	if err != nil || kind != frameAck {
		return fmt.Errorf("the receiver answered kind %d %q (%v)", kind, payload, err)
	}
	if gone {
		if err := writeFrame(from, frameAck, payload, nil); err != nil {
			return err
		}
		if kind, _, _, err := fr.frame(0); err != nil || kind != frameCommit {
			return fmt.Errorf("the sender decided kind %d (%v)", kind, err)
		}
		return to.Close()
	}
	b, _ := json.Marshal(&handOverCount{Error: "the relay says no"})
	if err := writeFrame(from, frameRefuse, b, nil); err != nil {
		return err
	}
	if kind, _, _, err := fr.frame(0); err != nil || kind != frameAbort {
		return fmt.Errorf("the sender decided kind %d (%v)", kind, err)
	}
	return writeFrame(to, frameAbort, nil, nil)
}

// TestHandOverDecision: after the receiver's ack, the sender alone
// decides. A receiver whose sender goes silent (EOF: it died, its
// references are gone) takes the sessions and runs them; a receiver told
// to abort closes everything it received, and the sessions run on in the
// sender, undisturbed. Transfers under way throughout arrive exact.
func TestHandOverDecision(t *testing.T) {
	for _, gone := range []bool{true, false} {
		t.Run(map[bool]string{true: "sender gone", false: "aborted"}[gone], func(t *testing.T) {
			h := newHarness(t)
			fds0 := openFDs(t)
			sp := needSplicer(t, Options{})
			const n = 3
			type sess struct {
				p            *pair
				done         chan Stats
				sentC, sentS int64
				gotC, gotS   atomic.Int64
				errs         [4]error
			}
			stop := make(chan struct{})
			all := make([]*sess, n)
			var wg sync.WaitGroup
			for i := range all {
				s := &sess{p: h.pair(), done: make(chan Stats, 1)}
				all[i] = s
				if err := sp.SpliceWithMeta(s.p.pc, s.p.ps, nil, nil, []byte(fmt.Sprint(i)), func(st Stats) { s.done <- st }); err != nil {
					t.Fatal(err)
				}
				wg.Add(4)
				go func() {
					defer wg.Done()
					s.sentC, s.errs[0] = sendUntil(s.p.client, i, stop, 1<<20, 2*time.Millisecond)
				}()
				go func() {
					defer wg.Done()
					s.sentS, s.errs[1] = sendUntil(s.p.server, i+1, stop, 1<<20, 2*time.Millisecond)
				}()
				go func() { defer wg.Done(); s.errs[2] = recvCheck(s.p.server, i, &s.gotS) }()
				go func() { defer wg.Done(); s.errs[3] = recvCheck(s.p.client, i+1, &s.gotC) }()
			}
			a, a2 := unixConns(t)
			b2, b := unixConns(t)
			relayed := make(chan error, 1)
			go func() { relayed <- relayHandOver(a2, b2, gone) }()
			adopted := make(chan error, 1)
			var sp2 *Splicer
			go func() {
				var err error
				sp2, err = Adopt(b, Options{}, func(meta []byte, _ Live) func(Stats) {
					var i int
					fmt.Sscan(string(meta), &i)
					return func(st Stats) { all[i].done <- st }
				})
				adopted <- err
			}()
			_, herr := sp.HandOver(a)
			rerr, aerr := <-relayed, <-adopted
			for _, c := range []*net.UnixConn{a, a2, b, b2} {
				c.Close()
			}
			if rerr != nil {
				t.Fatalf("relay: %v", rerr)
			}
			owner := sp
			if gone {
				if herr != nil || aerr != nil {
					t.Fatalf("HandOver: %v; Adopt: %v", herr, aerr)
				}
				owner = sp2
			} else {
				t.Logf("HandOver: %v; Adopt: %v", herr, aerr)
				if herr == nil || !strings.Contains(herr.Error(), "the relay says no") {
					t.Errorf("HandOver: %v, want the refusal", herr)
				}
				if aerr == nil || !strings.Contains(aerr.Error(), "the sender aborted") {
					t.Errorf("Adopt: %v, want that the sender aborted", aerr)
				}
			}
			if k := owner.Sessions(); k != n {
				t.Errorf("%d sessions with their owner, want %d", k, n)
			}
			close(stop)
			wg.Wait()
			for i, s := range all {
				for _, err := range s.errs {
					if err != nil {
						t.Errorf("session %d: %v", i, err)
					}
				}
				if s.gotS.Load() != s.sentC || s.gotC.Load() != s.sentS {
					t.Errorf("session %d: the server got %d of %d bytes, the client %d of %d", i, s.gotS.Load(), s.sentC, s.gotC.Load(), s.sentS)
				}
				st := waitDone(t, s.done)
				if st.ClientToServer != uint64(s.sentC) || st.ServerToClient != uint64(s.sentS) {
					t.Errorf("session %d: stats %+v, want %d/%d", i, st, s.sentC, s.sentS)
				}
				s.p.close()
			}
			if k, err := owner.MapEntries(); k != 0 || err != nil {
				t.Errorf("%d map entries left (%v)", k, err)
			}
			owner.Close()
			if k := openFDs(t); k != fds0 {
				t.Errorf("open fds: %d before, %d after", fds0, k)
			}
		})
	}
}

// TestHandOverNeedsStream: both ends refuse a socket the protocol is not
// framed for, before anything else.
func TestHandOverNeedsStream(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "seqpacket")
	defer f.Close()
	defer unix.Close(fds[1])
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := Adopt(c.(*net.UnixConn), Options{}, nil); err == nil || !strings.Contains(err.Error(), "unix stream socket") {
		t.Errorf("Adopt on a seqpacket socket: %v", err)
	}
	sp := needSplicer(t, Options{})
	if _, err := sp.HandOver(c.(*net.UnixConn)); err == nil || !strings.Contains(err.Error(), "unix stream socket") {
		t.Errorf("HandOver on a seqpacket socket: %v", err)
	}
}
