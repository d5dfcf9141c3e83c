package sysmon

import (
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// switches is a thread's voluntary context switches so far.
func switches(t *testing.T, tid int) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/task/" + strconv.Itoa(tid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "voluntary_ctxt_switches:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	t.Fatalf("no voluntary_ctxt_switches for thread %d", tid)
	return 0
}

// TestThreadIsSysmon: the thread Thread names behaves as sysmon does. With
// one P, a goroutine that blocks in 200 µs system calls (as an event loop
// blocks in epoll_wait) has its P taken back by sysmon each time, which
// keeps sysmon polling every 20 µs: the named thread wakes hundreds of
// times, and it is neither the main thread nor the one in the syscalls.
// An idle M parked on its futex (any other thread) would not move.
func TestThreadIsSysmon(t *testing.T) {
	tid, err := Thread()
	if err != nil {
		t.Fatal(err)
	}
	if tid == os.Getpid() {
		t.Fatalf("Thread returned the main thread %d", tid)
	}
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	before := switches(t, tid)
	worker := make(chan int)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		worker <- unix.Gettid()
		ts := unix.Timespec{Nsec: 200_000}
		for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); {
			// A blocking system call through the runtime (entersyscall),
			// as gnet's epoll_wait.
			syscall.Syscall(syscall.SYS_NANOSLEEP, uintptr(unsafe.Pointer(&ts)), 0, 0)
		}
		close(worker)
	}()
	busy := <-worker
	for range worker {
	}
	woke := switches(t, tid) - before
	if busy == tid {
		t.Fatalf("Thread named the thread that made the system calls (%d)", tid)
	}
	if woke < 100 {
		t.Fatalf("thread %d woke %d times while a P sat in system calls; sysmon polls every 20 µs then (want ≥ 100)", tid, woke)
	}
	t.Logf("thread %d (sysmon) woke %d times in 300 ms of 200 µs system calls", tid, woke)
}

func policy(t *testing.T, tid int) uint32 {
	t.Helper()
	a, err := unix.SchedGetAttr(tid, 0)
	if err != nil {
		t.Fatalf("sched_getattr %d: %v", tid, err)
	}
	return a.Policy
}

func slackOf(t *testing.T, tid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(tid) + "/timerslack_ns")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestGuard: Start puts sysmon under SCHED_BATCH with a 1 ms timer slack
// (as root) and leaves the rest; a thread that is under SCHED_BATCH too
// (as one sysmon starts would be) is given SCHED_OTHER back by the next
// check, and (as root) a thread with sysmon's slack the main thread's,
// while a thread with a slack of its own keeps it.
func TestGuard(t *testing.T) {
	g, err := Start(time.Hour, time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	old := slackOf(t, os.Getpid())
	defer func() {
		g.Stop()
		normal := unix.SchedAttr{Policy: unix.SCHED_NORMAL}
		_ = unix.SchedSetAttr(g.Thread(), &normal, 0)
		_ = os.WriteFile("/proc/"+strconv.Itoa(g.Thread())+"/timerslack_ns", []byte(old), 0)
	}()
	if p := policy(t, g.Thread()); p != unix.SCHED_BATCH {
		t.Fatalf("sysmon thread %d has policy %d, want SCHED_BATCH", g.Thread(), p)
	}
	switch ok, err := g.SlackSet(); {
	case ok && slackOf(t, g.Thread()) != "1000000":
		t.Fatalf("SlackSet reports the slack raised, but thread %d has %s ns", g.Thread(), slackOf(t, g.Thread()))
	case !ok && os.Geteuid() == 0:
		t.Fatalf("as root the timer slack must be settable: %v", err)
	case !ok:
		t.Logf("timer slack not raised without root: %v", err)
	}
	if got := slackOf(t, os.Getpid()); got != old {
		t.Fatalf("the main thread's timer slack changed to %s ns", got)
	}
	if p := policy(t, os.Getpid()); p != unix.SCHED_NORMAL {
		t.Fatalf("main thread has policy %d, want SCHED_NORMAL", p)
	}

	// Threads that set their own policy or slack (a thread may always set
	// its own), locked to their goroutines until the test ends; they
	// exit with them (a goroutine that ends locked takes its thread).
	done := make(chan struct{})
	defer close(done)
	thread := func(policy int, slack time.Duration) int {
		tids := make(chan int)
		go func() {
			runtime.LockOSThread()
			if policy >= 0 {
				if err := unix.SchedSetAttr(0, &unix.SchedAttr{Policy: uint32(policy)}, 0); err != nil {
					t.Error(err)
				}
			}
			if slack > 0 {
				if err := unix.Prctl(unix.PR_SET_TIMERSLACK, uintptr(slack.Nanoseconds()), 0, 0, 0); err != nil {
					t.Error(err)
				}
			}
			tids <- unix.Gettid()
			<-done
		}()
		return <-tids
	}
	tid := thread(unix.SCHED_BATCH, 0)
	withSysmonSlack := thread(-1, time.Millisecond)
	ownSlack := thread(-1, 3*time.Millisecond)
	// At least that one: a thread sysmon started since Start is under
	// SCHED_BATCH too, and set back as well.
	if n := g.Check(); n < 1 {
		t.Fatalf("Check changed %d threads, want the one under SCHED_BATCH", n)
	}
	if p := policy(t, tid); p != unix.SCHED_NORMAL {
		t.Fatalf("thread %d still has policy %d after the check", tid, p)
	}
	if p := policy(t, g.Thread()); p != unix.SCHED_BATCH {
		t.Fatalf("the check moved sysmon itself (policy %d)", p)
	}
	if ok, _ := g.SlackSet(); ok {
		if got := slackOf(t, withSysmonSlack); got != old {
			t.Errorf("thread %d with sysmon's slack has %s ns after the check, want the main thread's %s", withSysmonSlack, got, old)
		}
		if got := slackOf(t, g.Thread()); got != "1000000" {
			t.Errorf("the check changed sysmon's own slack to %s ns", got)
		}
	}
	if got := slackOf(t, ownSlack); got != "3000000" {
		t.Errorf("thread %d with a slack of its own has %s ns after the check, want 3000000", ownSlack, got)
	}
}

// TestStartLeavesOperatorPolicy: a process an operator started under
// another policy (here SCHED_BATCH, as chrt -b or systemd's
// CPUSchedulingPolicy would) is left alone.
func TestStartLeavesOperatorPolicy(t *testing.T) {
	batch := unix.SchedAttr{Policy: unix.SCHED_BATCH}
	if err := unix.SchedSetAttr(os.Getpid(), &batch, 0); err != nil {
		t.Fatal(err)
	}
	defer func() {
		normal := unix.SchedAttr{Policy: unix.SCHED_NORMAL}
		_ = unix.SchedSetAttr(os.Getpid(), &normal, 0)
	}()
	if g, err := Start(time.Hour, 0); err != ErrNotNormal {
		if g != nil {
			g.Stop()
		}
		t.Fatalf("Start under SCHED_BATCH: %v, want ErrNotNormal", err)
	}
}
