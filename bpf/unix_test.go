package bpf

import (
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// unixUpstream returns the proxy's fd of a unix-socket connection and the
// "server app" end.
func unixUpstream(t *testing.T) (int, net.Conn) {
	path := filepath.Join(t.TempDir(), "pg.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); acc <- c }()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	rc, _ := c.(*net.UnixConn).SyscallConn()
	fd := -1
	rc.Control(func(raw uintptr) { fd, _ = unix.FcntlInt(raw, unix.F_DUPFD_CLOEXEC, 0) })
	c.Close()
	return fd, <-acc
}

// TestSpliceRefusesUnix: a unix-socket server side is refused before
// anything changes, so the caller can relay it with the same fds and
// read-ahead.
func TestSpliceRefusesUnix(t *testing.T) {
	sp := needSplicer(t, Options{})
	if sp.SupportsUnix() {
		t.Fatal("SupportsUnix() = true")
	}
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	ufd, uapp := unixUpstream(t)
	defer uapp.Close()
	defer unix.Close(ufd)
	defer unix.Close(p.ps)
	defer unix.Close(p.pc)
	err := sp.Splice(p.pc, ufd, []byte("x"), []byte("y"), func(Stats) { t.Error("onDone called") })
	if !errors.Is(err, ErrUnixUnsupported) {
		t.Fatalf("Splice with a unix upstream: %v, want ErrUnixUnsupported", err)
	}
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Fatalf("map entries after refusal: %d %v", n, err)
	}
	// The fds are untouched: the user-space relay can still use them.
	if _, err := unix.Write(ufd, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(uapp, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("unix upstream after refusal: %q %v", buf, err)
	}
}

// TestUnixEgressKernelBehaviour records why unix upstreams are refused: it
// splices a TCP client with a unix upstream by hand (bypassing Splice's
// check) and reports what each direction does. It asserts nothing about
// the kernel; it logs, so that a future kernel that can do it is noticed
// (run with -v).
func TestUnixEgressKernelBehaviour(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	unix.Close(p.ps)
	ufd, uapp := unixUpstream(t)
	defer uapp.Close()
	cc, _ := cookieOf(p.pc)
	uc, _ := cookieOf(ufd)
	defer func() {
		for _, c := range []uint64{cc, uc} {
			sp.obj.VerdictSocks.Delete(c)
			sp.obj.Targets.Delete(c)
			sp.obj.Dirs.Delete(c)
		}
		unix.Close(p.pc)
		unix.Close(ufd)
	}()
	for _, kv := range [][2]uint64{{cc, uint64(p.pc)}, {uc, uint64(ufd)}} {
		if err := sp.obj.Targets.Update(kv[0], kv[1], ebpf.UpdateNoExist); err != nil {
			t.Fatalf("unix socket into SOCKHASH: %v", err)
		}
	}
	sp.obj.Dirs.Update(cc, &spliceDir{Peer: uc, Limit: 1 << 30}, ebpf.UpdateNoExist)
	sp.obj.Dirs.Update(uc, &spliceDir{Peer: cc, Limit: 1 << 30}, ebpf.UpdateNoExist)
	for _, kv := range [][2]uint64{{cc, uint64(p.pc)}, {uc, uint64(ufd)}} {
		if err := sp.obj.VerdictSocks.Update(kv[0], kv[1], ebpf.UpdateNoExist); err != nil {
			t.Fatalf("verdict insert: %v", err)
		}
	}
	// unix -> TCP.
	uapp.Write([]byte("from-unix"))
	p.client.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 9)
	_, err := io.ReadFull(p.client, buf)
	t.Logf("unix -> tcp egress: got %q, err %v", buf, err)
	// TCP -> unix.
	p.client.Write([]byte("from-tcp"))
	uapp.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf = make([]byte, 8)
	_, err = io.ReadFull(uapp, buf)
	t.Logf("tcp -> unix egress: got %q, err %v", buf, err)
	e, _ := unix.GetsockoptInt(ufd, unix.SOL_SOCKET, unix.SO_ERROR)
	t.Logf("unix socket SO_ERROR after the redirect: %v", unix.Errno(e))
	var d spliceDir
	sp.obj.Dirs.Lookup(cc, &d)
	t.Logf("tcp->unix direction: redirected %d bytes", d.Redirected)
	sp.obj.Dirs.Lookup(uc, &d)
	t.Logf("unix->tcp direction: redirected %d bytes", d.Redirected)
	unix.SetNonblock(ufd, true)
	rb := make([]byte, 64)
	n, err := unix.Read(ufd, rb)
	t.Logf("read on the proxy's unix socket: %q %v", rb[:max(n, 0)], err)

	// The cause: for AF_UNIX the skb reaching the verdict is still owned
	// by the sending socket, so bpf_get_socket_cookie(skb) is the cookie
	// of the other process's end. Keying the direction by that cookie
	// makes it flow.
	rc, _ := uapp.(*net.UnixConn).SyscallConn()
	var appCookie uint64
	rc.Control(func(raw uintptr) { appCookie, _ = cookieOf(int(raw)) })
	sp.obj.Dirs.Update(appCookie, &spliceDir{Peer: cc, Limit: 1 << 30}, ebpf.UpdateNoExist)
	defer sp.obj.Dirs.Delete(appCookie)
	uapp.Write([]byte("keyed-by-sender"))
	buf = make([]byte, 15)
	p.client.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = io.ReadFull(p.client, buf)
	t.Logf("unix -> tcp with the direction keyed by the sender's cookie: got %q, err %v", buf, err)
	_ = os.Stderr
}
