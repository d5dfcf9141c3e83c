// Package sysmon keeps the Go runtime's system monitor thread from
// preempting the database each time it wakes.
//
// Why: pgmfa's gnet event loops block in their own epoll_wait, a system
// call that holds a P (runtime/proc.go). The runtime's sysmon thread takes
// back a P that has been in a system call for more than 10 ms (or at once
// when no P is idle), and whenever a loop then wakes it resets its own
// sleep to 20 µs and polls at that rate for a millisecond or more before it
// backs off. A login waits for the database that long twice, so every
// login sets off such a burst: 73 nanosleep wake-ups of that one thread per
// login (`perf trace -s -p PID`, 100 logins), 44 % of the proxy's CPU
// samples in runtime.sysmon → usleep (`perf record -g`), and — what costs
// the client — each wake-up preempts whatever runs on that core, on a
// loaded 2-core host the database's backend starting up: two context
// switches per wake-up, expensive in a virtualised kernel (the samples sit
// in pvm_irq_enable under finish_task_switch). gnet offers no way to wait
// in Go's netpoller instead, and the runtime no knob for sysmon.
//
// What this does: sysmon's thread is put under SCHED_BATCH. A SCHED_BATCH
// task keeps its full share of the CPU but never preempts a running task
// when it wakes (kernel/sched/fair.c, the wake-up preemption check: "Batch
// tasks do not preempt non-idle tasks (their preemption is driven by the
// tick)"), so its 20 µs polls wait for an idle core or the next tick
// instead of interrupting the database. Measured on this project's 2-core
// VM (kernel 6.18), 9 interleaved rounds of 60 logins each against a
// direct login of ~22 ms, median extra login latency over direct: +4.7 ms
// with sysmon as it is, +2.25 ms with it under SCHED_BATCH (chrt -b on the
// running proxy's thread). SCHED_IDLE measured +1.9 ms and is not used: a
// SCHED_IDLE thread gets almost no CPU on a busy host, and a thread it
// starts inherits a policy that an unprivileged process cannot undo. nice
// 19 changed nothing (a niced thread still preempts on wake-up).
//
// SCHED_BATCH spares the database the preemption, not the wake-ups, which
// still cost CPU. When the process may (CAP_SYS_NICE, as pgmfa has while
// it starts as root), sysmon's timer slack is also raised: its usleep(20)
// then lets the kernel fire the timer up to the slack late, together with
// whatever else is due, so a burst of polls shrinks to a few. At 1 ms
// (`make bench`, login-latency and connect, 3 rounds each, same day):
// sysmon wake-ups 59 → 17 per login (counted in /proc/TID/status), proxy
// context switches 97 → 50 per login, proxy CPU 0.56 → 0.37 s per 4 s
// run, extra login latency +3.3 ±0.6 → +2.7 ±0.2 ms. pgmfa uses 1 ms.
//
// 10 ms was measured too and not kept (1 ms and 10 ms alternated, six
// runs each of `go run ./bench -paths direct,pgmfa-sockmap -workloads
// connect,login-latency -rounds 3 -max-rounds 3 -duration 4s -scale 1`): it
// halves the proxy's context switches per login (46–53 → 23–24) and cuts
// its CPU by ~15 %, but sysmon is also what takes the Ps back from the
// event loops blocked in epoll_wait, and until it does nobody polls Go's
// netpoller, where the acceptor waits. The wait from the client's
// handshake to pgmfa's accept(2) (bpftrace: sock:inet_sock_set_state
// SYN_RECV → ESTABLISHED on the listening port to sys_exit_accept4, two
// runs each, ~650 logins per run) rose from 0.77 and 0.93 ms to 1.98 and
// 2.37 ms mean; the login as the client saw it read +1.07 and +1.85 ms
// over direct at 1 ms against +2.48 and +2.25 ms at 10 ms in those two
// pairs, and +1.65 against +2.06 ms as the median of the six runs each.
//
// Threads inherit their creator's policy, and sysmon itself starts threads
// (runtime.startm, when it hands a P to a new M), so a Guard checks the
// process's threads periodically and gives any other thread found under
// SCHED_BATCH the process's own policy back: a goroutine may then run
// without wake-up preemption for at most one check interval.
//
// Threads inherit the slack as they inherit the policy. Check gives them
// the main thread's slack back, but reading or writing another thread's
// slack needs CAP_SYS_NICE, which pgmfa drops before it accepts: threads
// that sysmon starts after that keep sysmon's slack, and a timed wait on
// one of them (a Go timer that comes due while that thread polls) may end
// up to the slack late; pgmfa's own deadlines are milliseconds to
// minutes.
package sysmon

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Thread returns the thread ID of the Go runtime's sysmon.
//
// The runtime starts sysmon first thing in runtime.main, on a thread of its
// own, before any package init runs and before any other thread exists
// (Linux, a binary without cgo: no template thread, nothing locked). So it
// is the second thread the process created (see ThreadsByStart).
func Thread() (int, error) {
	ts, err := ThreadsByStart(os.Getpid())
	if err != nil {
		return 0, err
	}
	if len(ts) < 2 || ts[0] != os.Getpid() {
		return 0, errors.New("sysmon: the process's threads are not in the order the Go runtime starts them")
	}
	return ts[1], nil
}

// ThreadsByStart returns the thread IDs of process pid in the order the
// threads started: by start time, thread IDs breaking ties (IDs grow; a
// wrap of pid_max within the same clock tick is the one case this
// misorders). Threads that exit meanwhile are left out.
func ThreadsByStart(pid int) ([]int, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	type thread struct {
		tid   int
		start uint64
	}
	var ts []thread
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := startTime(dir + "/" + e.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		ts = append(ts, thread{tid, st})
	}
	sort.Slice(ts, func(i, j int) bool {
		if ts[i].start != ts[j].start {
			return ts[i].start < ts[j].start
		}
		return ts[i].tid < ts[j].tid
	})
	tids := make([]int, len(ts))
	for i, t := range ts {
		tids[i] = t.tid
	}
	return tids, nil
}

// startTime is field 22 of a thread's stat file: when the thread started,
// in clock ticks since boot.
func startTime(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, errors.New("sysmon: unreadable stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): field 22 is f[19].
	if len(f) < 20 {
		return 0, errors.New("sysmon: short stat")
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// Guard holds sysmon's thread under SCHED_BATCH and the process's other
// threads out of it.
type Guard struct {
	tid       int
	base      unix.SchedAttr // the process's own policy, given back to threads that inherited SCHED_BATCH
	slack     time.Duration  // sysmon's raised timer slack (0: not raised)
	baseSlack time.Duration  // the main thread's timer slack, given back to threads that inherited sysmon's
	slackErr  error          // why the timer slack was not raised (nil: it was)
	// slackDenied: another thread's slack could not be read (the process
	// dropped CAP_SYS_NICE); Check stops trying.
	slackDenied atomic.Bool
	stop        chan struct{}
	done        sync.WaitGroup
	once        sync.Once
}

// ErrNotNormal is returned by Start when the process does not run under
// SCHED_OTHER: an operator chose its policy (real-time, batch or idle),
// and pgmfa leaves it alone.
var ErrNotNormal = errors.New("sysmon: the process does not run under SCHED_OTHER; its scheduling is left as it is")

// Start finds sysmon's thread, puts it under SCHED_BATCH (its nice value
// kept), sets its timer slack to slack when slack > 0 and the process may
// (see SlackSet), and checks the other threads every interval (see Guard).
// SCHED_BATCH needs no privilege: a thread may always lower its own
// standing.
func Start(interval, slack time.Duration) (*Guard, error) {
	base, err := unix.SchedGetAttr(os.Getpid(), 0)
	if err != nil {
		return nil, fmt.Errorf("sysmon: sched_getattr: %w", err)
	}
	if base.Policy != unix.SCHED_NORMAL {
		return nil, ErrNotNormal
	}
	tid, err := Thread()
	if err != nil {
		return nil, err
	}
	attr := *base
	attr.Policy = unix.SCHED_BATCH
	if err := unix.SchedSetAttr(tid, &attr, 0); err != nil {
		return nil, fmt.Errorf("sysmon: putting thread %d under SCHED_BATCH: %w", tid, err)
	}
	g := &Guard{tid: tid, base: *base, stop: make(chan struct{})}
	g.slackErr = errors.New("sysmon: no timer slack asked for")
	if slack > 0 {
		if b, err := readSlack(os.Getpid()); err != nil {
			g.slackErr = err
		} else if g.slackErr = setSlack(tid, slack); g.slackErr == nil {
			g.slack, g.baseSlack = slack, b
		}
	}
	g.done.Add(1)
	go g.run(interval)
	return g, nil
}

// Thread is sysmon's thread ID.
func (g *Guard) Thread() int { return g.tid }

// SlackSet reports whether Start raised sysmon's timer slack, and why not.
// Writing another thread's timer slack needs CAP_SYS_NICE.
func (g *Guard) SlackSet() (bool, error) { return g.slackErr == nil, g.slackErr }

// setSlack writes a thread's timer slack (Linux 4.6+: /proc/TID/timerslack_ns;
// the file is reached by thread ID at /proc's top level, not under
// /proc/self/task).
func setSlack(tid int, d time.Duration) error {
	err := os.WriteFile("/proc/"+strconv.Itoa(tid)+"/timerslack_ns", []byte(strconv.FormatInt(d.Nanoseconds(), 10)), 0)
	if err != nil {
		return fmt.Errorf("sysmon: timer slack of thread %d: %w", tid, err)
	}
	return nil
}

// readSlack reads a thread's timer slack. Reading another thread's needs
// CAP_SYS_NICE too.
func readSlack(tid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(tid) + "/timerslack_ns")
	if err == nil {
		var ns int64
		if ns, err = strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); err == nil {
			return time.Duration(ns), nil
		}
	}
	return 0, fmt.Errorf("sysmon: timer slack of thread %d: %w", tid, err)
}

// Stop ends the checks (sysmon stays under SCHED_BATCH).
func (g *Guard) Stop() {
	g.once.Do(func() { close(g.stop) })
	g.done.Wait()
}

func (g *Guard) run(interval time.Duration) {
	defer g.done.Done()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-g.stop:
			return
		case <-t.C:
			g.Check()
		}
	}
}

// Check gives every thread but sysmon's that is under SCHED_BATCH the
// process's own policy back, and every other thread that has sysmon's
// raised timer slack the main thread's slack, and returns how many threads
// it changed. The slack needs CAP_SYS_NICE to read or write another
// thread's, so it is set back only while the process has it (pgmfa: until
// it drops its privileges, just before it accepts); the policy always.
func (g *Guard) Check() int {
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil || tid == g.tid {
			continue
		}
		changed := false
		if attr, err := unix.SchedGetAttr(tid, 0); err == nil && attr.Policy == unix.SCHED_BATCH {
			back := g.base
			back.Nice = attr.Nice
			changed = unix.SchedSetAttr(tid, &back, 0) == nil
		}
		if g.slack > 0 && !g.slackDenied.Load() {
			d, err := readSlack(tid)
			switch {
			case errors.Is(err, os.ErrPermission):
				g.slackDenied.Store(true)
			case err == nil && d == g.slack:
				changed = setSlack(tid, g.baseSlack) == nil || changed
			}
		}
		if changed {
			n++
		}
	}
	return n
}
