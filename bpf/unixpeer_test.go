package bpf

import (
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

// TestUnixPeerCookie: the cookie found through unix_diag is the one the
// other end reports for itself (SO_COOKIE), for the dialing and the
// accepted end alike.
func TestUnixPeerCookie(t *testing.T) {
	fd, app := unixUpstream(t)
	defer unix.Close(fd)
	defer app.Close()
	rc, err := app.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var appCookie, appPeer uint64
	var appErr error
	rc.Control(func(raw uintptr) {
		appCookie, _ = cookieOf(int(raw))
		appPeer, appErr = unixPeerCookie(int(raw))
	})
	got, err := unixPeerCookie(fd)
	if err != nil {
		t.Fatal(err)
	}
	if got != appCookie || appCookie == 0 {
		t.Errorf("peer cookie of the proxy's end = %#x, the accepted end's SO_COOKIE = %#x", got, appCookie)
	}
	own, _ := cookieOf(fd)
	if appErr != nil || appPeer != own {
		t.Errorf("peer cookie of the accepted end = %#x (%v), the proxy end's SO_COOKIE = %#x", appPeer, appErr, own)
	}
	// A TCP socket is not something unix_diag knows.
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	defer unix.Close(p.pc)
	defer unix.Close(p.ps)
	if _, err := unixPeerCookie(p.pc); err == nil {
		t.Error("unixPeerCookie of a TCP socket succeeded")
	}
}
