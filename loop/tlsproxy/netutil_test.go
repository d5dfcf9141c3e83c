package tlsproxy_test

import (
	"io"
	"net"
	"syscall"
	"testing"

	"github.com/pgmfa/pgmfa/loop/tlsproxy"
)

func TestFileConn(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := b.(*net.TCPConn).SyscallConn()
	var fd int
	raw.Control(func(f uintptr) { fd, err = syscall.Dup(int(f)) })
	if err != nil {
		t.Fatal(err)
	}
	b.Close() // the socket lives on in fd
	c, err := tlsproxy.FileConn(fd)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := a.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hi" {
		t.Fatalf("%v %q", err, buf)
	}
}
