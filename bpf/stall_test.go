package bpf

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// kernelMem samples what the kernel says about memory: TCP's charged pages
// (/proc/net/sockstat "TCP: ... mem"), Slab and MemAvailable
// (/proc/meminfo). The redirect queue is charged to no socket, so it shows
// up in MemAvailable, not in TCP mem.
type kernelMem struct{ tcpPages, slabKB, availKB int64 }

func (m kernelMem) String() string {
	return fmt.Sprintf("TCP mem %d pages (%.1f MiB), Slab %.1f MiB, MemAvailable %.1f MiB",
		m.tcpPages, float64(m.tcpPages*4096)/(1<<20), float64(m.slabKB)/1024, float64(m.availKB)/1024)
}

func sampleKernelMem(t testing.TB) kernelMem {
	var m kernelMem
	if b, err := os.ReadFile("/proc/net/sockstat"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 0 && f[0] == "TCP:" {
				for i := 1; i+1 < len(f); i += 2 {
					if f[i] == "mem" {
						m.tcpPages, _ = strconv.ParseInt(f[i+1], 10, 64)
					}
				}
			}
		}
	}
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(fs[1], 10, 64)
		switch fs[0] {
		case "Slab:":
			m.slabKB = v
		case "MemAvailable:":
			m.availKB = v
		}
	}
	return m
}

// stallBytes is the size of the stalled stream: multi-GB by default
// (PGMFA_STALL_BYTES overrides).
func stallBytes(t *testing.T) int64 {
	if v := os.Getenv("PGMFA_STALL_BYTES"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			t.Fatalf("PGMFA_STALL_BYTES=%q", v)
		}
		return n
	}
	return 3 << 30
}

// waitQuiet waits until the counter stops moving (the sender is blocked)
// or done is closed. Not an assertion on speed: it only decides when to
// measure.
func waitQuiet(n *atomic.Int64, done <-chan struct{}) {
	last, still := int64(-1), 0
	for still < 20 {
		select {
		case <-done:
			return
		case <-time.After(50 * time.Millisecond):
		}
		if v := n.Load(); v == last {
			still++
		} else {
			last, still = v, 0
		}
	}
}

// overSlack is one skb: the program checks the threshold (and the bound)
// before redirecting each skb, so the queue can exceed it by at most the
// previous one (64 KiB of payload on loopback); generous.
const overSlack = 256 << 10

func cookieMust(t *testing.T, fd int) uint64 {
	c, err := cookieOf(fd)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestStalledReaderUnbounded shows the pathology flow control exists for
// (PGMFA_STALL_COMPARE=1 only: it lets the kernel queue gigabytes). With
// flow control off and the hard bound out of reach, the redirect queue
// absorbs the whole stream.
func TestStalledReaderUnbounded(t *testing.T) {
	if os.Getenv("PGMFA_STALL_COMPARE") != "1" {
		t.Skip("set PGMFA_STALL_COMPARE=1 to measure kernel memory without the bound")
	}
	sp := needSplicer(t, Options{FlowThreshold: -1, MaxBacklog: 1 << 40})
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	total := stallBytes(t)
	before := sampleKernelMem(t)
	onDone, _ := doneChan(t)
	if err := sp.Splice(p.pc, p.ps, nil, nil, onDone); err != nil {
		t.Fatal(err)
	}
	var written atomic.Int64
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for written.Load() < total {
			w, err := p.server.Write(pattern[:min(int64(1<<20), total-written.Load())])
			written.Add(int64(w))
			if err != nil {
				return
			}
		}
	}()
	waitQuiet(&written, stopped)
	stalled := sampleKernelMem(t)
	var st spliceDir
	sp.obj.Dirs.Lookup(cookieMust(t, p.ps), &st)
	t.Logf("without the bound: server wrote %.1f MiB of %.1f GiB; redirected %.1f MiB", float64(written.Load())/(1<<20), float64(total)/(1<<30), float64(st.Redirected)/(1<<20))
	t.Logf("kernel before: %v", before)
	t.Logf("kernel stalled: %v", stalled)
	p.client.Close()
	p.server.Close()
}
