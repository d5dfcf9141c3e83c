package loop

import (
	"context"
	"io"
	"log/slog"
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

// TestDefaultMaxConnsFitsTheLimit: the default --max-conns leaves room for
// the reserve and three descriptors per connection.
func TestDefaultMaxConnsFitsTheLimit(t *testing.T) {
	n, limit := DefaultMaxConns(2)
	if n < 1 || uint64(n*fdsPerConn+fdReserve(2)) > limit && n != 1 {
		t.Fatalf("DefaultMaxConns = %d for an open-file limit of %d", n, limit)
	}
}
