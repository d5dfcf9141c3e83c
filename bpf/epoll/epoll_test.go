package epoll

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func eventfd(t *testing.T, s *Set) int {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.EpollCtl(s.FD(), unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}); err != nil {
		t.Fatal(err)
	}
	return fd
}

func poke(t *testing.T, fd int) {
	t.Helper()
	if _, err := unix.Write(fd, []byte{1, 0, 0, 0, 0, 0, 0, 0}); err != nil {
		t.Fatal(err)
	}
}

func newSet(t *testing.T) *Set {
	t.Helper()
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

type waited struct {
	n   int
	err error
	fd  int32
}

func waitAsync(s *Set, timeout time.Duration) chan waited {
	ch := make(chan waited, 1)
	go func() {
		events := make([]unix.EpollEvent, 4)
		n, err := s.Wait(events, timeout)
		ch <- waited{n, err, events[0].Fd}
	}()
	return ch
}

// stillWaiting fails the test with what when the Wait behind ch returns
// within d.
func stillWaiting(t *testing.T, ch chan waited, d time.Duration, what string) {
	t.Helper()
	select {
	case w := <-ch:
		t.Fatalf("%s: %+v", what, w)
	case <-time.After(d):
	}
}

// inEpollWait lists the epoll descriptors this process's threads are
// blocked on in epoll_wait(2)/epoll_pwait(2), read from
// /proc/self/task/*/syscall (the system call number, then its arguments).
func inEpollWait(t *testing.T) map[int]bool {
	t.Helper()
	tasks, err := filepath.Glob("/proc/self/task/*/syscall")
	if err != nil {
		t.Fatal(err)
	}
	fds := map[int]bool{}
	for _, p := range tasks {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the thread exited
		}
		f := strings.Fields(string(b))
		if len(f) < 2 || (f[0] != strconv.Itoa(unix.SYS_EPOLL_WAIT) && f[0] != strconv.Itoa(unix.SYS_EPOLL_PWAIT)) {
			continue
		}
		fd, err := strconv.ParseInt(strings.TrimPrefix(f[1], "0x"), 16, 64)
		if err == nil {
			fds[int(fd)] = true
		}
	}
	return fds
}

func TestWaitReturnsReadyEvents(t *testing.T) {
	s := newSet(t)
	efd := eventfd(t, s)
	ch := waitAsync(s, -1)
	stillWaiting(t, ch, 50*time.Millisecond, "Wait returned on an empty set")
	poke(t, efd)
	w := <-ch
	if w.err != nil || w.n != 1 || int(w.fd) != efd {
		t.Fatalf("Wait after the eventfd became readable: %+v, want 1 event for fd %d", w, efd)
	}
	// Level-triggered in the set: still readable, so a second Wait
	// returns at once, whether or not the netpoller saw a new edge.
	if w := <-waitAsync(s, -1); w.err != nil || w.n != 1 {
		t.Fatalf("second Wait: %+v", w)
	}
}

func TestWaitTimeoutThenNoLimit(t *testing.T) {
	s := newSet(t)
	efd := eventfd(t, s)
	if w := <-waitAsync(s, 20*time.Millisecond); w.err != nil || w.n != 0 {
		t.Fatalf("Wait with a timeout on an empty set: %+v, want 0 and no error", w)
	}
	if w := <-waitAsync(s, 0); w.err != nil || w.n != 0 {
		t.Fatalf("Wait(0) on an empty set: %+v", w)
	}
	// The earlier deadline must not end a wait without one.
	ch := waitAsync(s, -1)
	stillWaiting(t, ch, 100*time.Millisecond, "a Wait without limit returned after an earlier timed Wait")
	poke(t, efd)
	if w := <-ch; w.err != nil || w.n != 1 {
		t.Fatalf("Wait: %+v", w)
	}
}

func TestCloseEndsAWait(t *testing.T) {
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	ch := waitAsync(s, -1)
	time.Sleep(20 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case w := <-ch:
		if w.err == nil {
			t.Fatalf("Wait on a closed set: %+v, want an error", w)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not end the Wait")
	}
}

// TestWaitHoldsNoThread is the package's reason to exist: goroutines in
// Wait sleep in the netpoller, so no thread sits in epoll_wait on their
// sets (such a thread would keep its P until sysmon takes it back). The
// same check on a plain unix.EpollWait shows it can fail.
func TestWaitHoldsNoThread(t *testing.T) {
	var sets []*Set
	var wakes []int
	var waits []chan waited
	for i := 0; i < 4; i++ {
		s := newSet(t)
		wakes = append(wakes, eventfd(t, s))
		sets = append(sets, s)
		waits = append(waits, waitAsync(s, -1))
	}
	raw, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(raw)
	rawWake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rawWake)
	if err := unix.EpollCtl(raw, unix.EPOLL_CTL_ADD, rawWake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(rawWake)}); err != nil {
		t.Fatal(err)
	}
	// Fatal below leaves the plain waiter blocked; the test binary exits
	// anyway.
	rawDone := make(chan struct{})
	go func() {
		defer close(rawDone)
		events := make([]unix.EpollEvent, 1)
		for {
			if _, err := unix.EpollWait(raw, events, -1); err != unix.EINTR {
				return
			}
		}
	}()
	// The blocked thread shows once it is in the call.
	deadline := time.Now().Add(10 * time.Second)
	for !inEpollWait(t)[raw] {
		if time.Now().After(deadline) {
			t.Fatal("the plain epoll_wait never showed in /proc/self/task/*/syscall: the check cannot see blocked threads")
		}
		time.Sleep(5 * time.Millisecond)
	}
	blocked := inEpollWait(t)
	for i, s := range sets {
		if blocked[s.FD()] {
			t.Errorf("set %d (fd %d): a thread is blocked in epoll_wait on it", i, s.FD())
		}
	}
	poke(t, rawWake)
	<-rawDone
	for i := range sets {
		poke(t, wakes[i])
		if w := <-waits[i]; w.err != nil || w.n != 1 {
			t.Errorf("set %d: Wait after its eventfd became readable: %+v", i, w)
		}
	}
}
