package bpf

import (
	"bytes"
	"io"
	"testing"
)

func TestSpliceSmoke(t *testing.T) {
	sp := needSplicer(t, Options{})
	h := newHarness(t)
	p := h.pair()
	defer p.close()
	onDone, done := doneChan(t)
	if err := sp.Splice(p.pc, p.ps, []byte("hello "), []byte("welcome "), onDone); err != nil {
		t.Fatal(err)
	}
	// 2 targets + 2 verdict sockets + 2 directions + 2 relayed counts;
	// nothing drained.
	if n, err := sp.MapEntries(); n != 8 || err != nil {
		t.Errorf("map entries of a live session: %d %v, want 8", n, err)
	}
	if n := sp.Sessions(); n != 1 {
		t.Errorf("Sessions() = %d", n)
	}
	if _, err := p.client.Write([]byte("query")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 11)
	if _, err := io.ReadFull(p.server, buf); err != nil || string(buf) != "hello query" {
		t.Fatalf("server got %q, %v", buf, err)
	}
	if _, err := p.server.Write([]byte("rows")); err != nil {
		t.Fatal(err)
	}
	buf = make([]byte, 12)
	if _, err := io.ReadFull(p.client, buf); err != nil || string(buf) != "welcome rows" {
		t.Fatalf("client got %q, %v", buf, err)
	}
	p.client.(interface{ CloseWrite() error }).CloseWrite()
	rest, err := io.ReadAll(p.server)
	if err != nil || len(rest) != 0 {
		t.Fatalf("server after client FIN: %q %v", rest, err)
	}
	p.server.Write([]byte("bye"))
	p.server.(interface{ CloseWrite() error }).CloseWrite()
	rest, err = io.ReadAll(p.client)
	if err != nil || !bytes.Equal(rest, []byte("bye")) {
		t.Fatalf("client after server FIN: %q %v", rest, err)
	}
	st := waitDone(t, done)
	t.Logf("%+v", st)
	if n, err := sp.MapEntries(); n != 0 || err != nil {
		t.Fatalf("map entries left: %d %v", n, err)
	}
}
