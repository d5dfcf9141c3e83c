package main

import (
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
)

// Context switches during one measurement, per process group: the path's
// own process (pgmfa or pgbouncer, every thread), PostgreSQL (the
// postmaster and every child: backends, walwriter, ...), the kernel's
// kworker threads (every sockmap redirect is sent by one: the hop of a
// spliced session shows here; other jobs' kernel work too, so an upper
// bound on a shared machine), and the whole machine (/proc/stat ctxt:
// clients and everything else included).
//
// Backends come and go during a run (pgbench -C opens one per transaction,
// and every pgbench run closes its backends before it returns), and a
// task's counters disappear with it, so the sampler reads every task's
// voluntary+involuntary counters every ctxSampleEvery and keeps, per task,
// the first and the last value seen: a task that exits loses at most one
// interval of its switches. Tasks present at the start count from their
// value then; tasks born during the run count from zero.

const ctxSampleEvery = 50 * time.Millisecond

// ctxGroup is one group's tasks: tid → first and last count seen.
type ctxGroup struct {
	first, last map[int]uint64
}

func (g *ctxGroup) see(tid int, n uint64, atStart bool) {
	if _, ok := g.first[tid]; !ok {
		if atStart {
			g.first[tid] = n
		} else {
			g.first[tid] = 0
		}
	}
	g.last[tid] = n
}

func (g *ctxGroup) total() float64 {
	var s uint64
	for tid, l := range g.last {
		if f := g.first[tid]; l >= f {
			s += l - f
		}
	}
	return float64(s)
}

// ctxSampler samples until stop.
type ctxSampler struct {
	proxyPID, pgPID int
	proxy, pg, kw   ctxGroup
	kworkers        []int // kworker pids, found again every ctxKworkerScan
	lastScan        time.Time
	sys0, sys1      uint64
	quit            chan struct{}
	done            sync.WaitGroup
}

// startCtxSampler starts sampling; a zero pid leaves that group out.
func startCtxSampler(proxyPID, pgPID int) *ctxSampler {
	s := &ctxSampler{proxyPID: proxyPID, pgPID: pgPID, quit: make(chan struct{}),
		proxy: ctxGroup{map[int]uint64{}, map[int]uint64{}}, pg: ctxGroup{map[int]uint64{}, map[int]uint64{}},
		kw: ctxGroup{map[int]uint64{}, map[int]uint64{}}}
	s.sys0 = systemCtxt()
	s.sample(true)
	s.done.Add(1)
	go func() {
		defer s.done.Done()
		t := time.NewTicker(ctxSampleEvery)
		defer t.Stop()
		for {
			select {
			case <-s.quit:
				return
			case <-t.C:
				s.sample(false)
			}
		}
	}()
	return s
}

// stop takes a last sample and returns the switches per group.
func (s *ctxSampler) stop() (proxy, pg, kworker, system float64) {
	close(s.quit)
	s.done.Wait()
	s.sample(false)
	s.sys1 = systemCtxt()
	return s.proxy.total(), s.pg.total(), s.kw.total(), float64(s.sys1 - s.sys0)
}

// ctxKworkerScan is how often the sampler looks for kworkers again (the
// kernel creates and retires them as the work needs).
const ctxKworkerScan = time.Second

func (s *ctxSampler) sample(atStart bool) {
	if now := time.Now(); now.Sub(s.lastScan) >= ctxKworkerScan {
		s.lastScan = now
		s.kworkers = kworkerPIDs()
	}
	for _, pid := range s.kworkers {
		for tid, n := range taskSwitches(pid) {
			s.kw.see(tid, n, atStart)
		}
	}
	if s.proxyPID != 0 {
		for tid, n := range taskSwitches(s.proxyPID) {
			s.proxy.see(tid, n, atStart)
		}
	}
	if s.pgPID != 0 {
		for _, pid := range append(pgcluster.Children(s.pgPID), s.pgPID) {
			for tid, n := range taskSwitches(pid) {
				s.pg.see(tid, n, atStart)
			}
		}
	}
}

// taskSwitches reads voluntary+nonvoluntary context switches of every
// thread of pid.
func taskSwitches(pid int) map[int]uint64 {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	out := make(map[int]uint64, len(ents))
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(dir + "/" + e.Name() + "/status")
		if err != nil {
			continue
		}
		if n, ok := parseCtxtSwitches(string(b)); ok {
			out[tid] = n
		}
	}
	return out
}

// parseCtxtSwitches sums voluntary_ctxt_switches and
// nonvoluntary_ctxt_switches from a /proc status file.
func parseCtxtSwitches(status string) (uint64, bool) {
	var sum uint64
	found := 0
	for _, line := range strings.Split(status, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "voluntary_ctxt_switches" && k != "nonvoluntary_ctxt_switches") {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return 0, false
		}
		sum += n
		found++
	}
	return sum, found == 2
}

// kworkerPIDs lists the kernel's kworker threads (comm "kworker/...").
func kworkerPIDs() []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if b, err := os.ReadFile("/proc/" + e.Name() + "/comm"); err == nil && isKworker(string(b)) {
			out = append(out, pid)
		}
	}
	return out
}

func isKworker(comm string) bool { return strings.HasPrefix(comm, "kworker/") }

// systemCtxt is the machine's context switches since boot (/proc/stat).
func systemCtxt() uint64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	return parseStatCtxt(string(b))
}

// parseStatCtxt finds "ctxt N" in /proc/stat.
func parseStatCtxt(stat string) uint64 {
	for _, line := range strings.Split(stat, "\n") {
		if rest, ok := strings.CutPrefix(line, "ctxt "); ok {
			n, _ := strconv.ParseUint(strings.TrimSpace(rest), 10, 64)
			return n
		}
	}
	return 0
}

// addCtxDetail records the switches in a sample's detail, per transaction
// when the workload counted transactions (pgbench) or logins.
func addCtxDetail(d map[string]float64, proxy, pg, kworker, system float64, hasProxy bool) {
	tx := d["transactions"]
	if tx == 0 {
		tx = d["logins"]
	}
	if tx <= 0 {
		return
	}
	if hasProxy {
		d["cs_per_tx_proxy"] = proxy / tx
	}
	d["cs_per_tx_postgres"] = pg / tx
	d["cs_per_tx_kworker"] = kworker / tx
	d["cs_per_tx_system"] = system / tx
}
