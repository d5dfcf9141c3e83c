package loop

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"
)

// TestEngineStopIsAnError: when the event engine stops without Stop (gnet
// shuts its engine down on a fatal error and returns nil), Run returns an
// error, so that `pgmfa serve` exits non-zero and a service manager
// restarts it. Stopping the engine behind the Server's back stands in for
// the fatal error.
func TestEngineStopIsAnError(t *testing.T) {
	s, err := New(Config{
		Listen:   []string{"127.0.0.1:0"},
		Upstream: "127.0.0.1:1",
		Loops:    1,
		Splice:   SpliceOff,
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run() }()
	<-s.Ready()
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = s.eng.Stop(ctx)
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "stopped unexpectedly") {
			t.Fatalf("Run after the engine stopped by itself: %v, want an error", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return")
	}
}

// TestBeforeAcceptRefuses: a BeforeAccept error (pgmfa serve's failed
// privilege drop) stops the server before it accepts anyone: Ready says
// why, Run returns it, and the listening address was never served.
func TestBeforeAcceptRefuses(t *testing.T) {
	refusal := errors.New("cannot drop privileges: test")
	var addr string
	client := make(chan struct{})
	s, err := New(Config{
		Listen:   []string{"127.0.0.1:0"},
		Upstream: "127.0.0.1:1",
		Loops:    1,
		Splice:   SpliceOff,
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	s.cfg.BeforeAccept = func() error {
		// The listener is bound by now: a client may already be in its
		// backlog, and must never be served.
		addr = s.acc.lns[0].Addr().String()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return err
		}
		go func() {
			defer close(client)
			defer c.Close()
			_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
			_, _ = c.Write([]byte{0, 0, 0, 8, 4, 210, 22, 47}) // SSLRequest
			b := make([]byte, 1)
			if n, _ := c.Read(b); n > 0 {
				t.Errorf("a client was answered %q before the server refused to start", b[:n])
			}
		}()
		return refusal
	}
	done := make(chan error, 1)
	go func() { done <- s.Run() }()
	<-s.Ready()
	if !errors.Is(s.Err(), refusal) {
		t.Fatalf("Ready with %v, want the refusal", s.Err())
	}
	select {
	case err := <-done:
		if !errors.Is(err, refusal) {
			t.Fatalf("Run returned %v, want the refusal", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return")
	}
	<-client // its connection ended unanswered
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatal("the address still accepts connections after the refusal")
	}
}

// TestDefaultMaxConnsFitsTheLimit: the default --max-conns leaves room for
// the reserve and three descriptors per connection.
func TestDefaultMaxConnsFitsTheLimit(t *testing.T) {
	n, limit := DefaultMaxConns(2)
	if n < 1 || uint64(n*fdsPerConn+fdReserve(2)) > limit && n != 1 {
		t.Fatalf("DefaultMaxConns = %d for an open-file limit of %d", n, limit)
	}
}
