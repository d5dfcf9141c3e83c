package web

import (
	"bytes"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
)

// Plaintext only on loopback and only when asked for; never both a
// certificate and plaintext.
func TestListenRefusesPlaintext(t *testing.T) {
	if _, err := Listen("127.0.0.1:0", nil, false); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("no certificate, no flag: %v", err)
	}
	for _, addr := range []string{"0.0.0.0:0", ":0", "192.0.2.1:0"} {
		if _, err := Listen(addr, nil, true); err == nil || !strings.Contains(err.Error(), "loopback") {
			t.Fatalf("plaintext on %s: %v", addr, err)
		}
	}
	ln, err := Listen("127.0.0.1:0", nil, true)
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
}

// A webhook that always fails is given up on after its retries (counted),
// and Send never blocks, even with the queue full and the poster stuck.
func TestWebhookGivesUpAndNeverBlocks(t *testing.T) {
	var calls atomic.Int32
	stuck := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) > 3 {
			<-stuck
		}
		w.WriteHeader(http.StatusBadGateway)
	}))
	defer srv.Close()
	defer close(stuck)
	// A webhook nobody answers: its URL (often a secret) is not logged.
	var logs bytes.Buffer
	dead := NewWebhook("http://127.0.0.1:1/hooks/SECRET", slog.New(slog.NewTextHandler(&logs, nil)))
	dead.Backoff = nil
	dead.Send(Event{User: "alice"})
	for dead.Failed() != 1 {
		time.Sleep(10 * time.Millisecond)
	}
	dead.Close()
	if !strings.Contains(logs.String(), "giving up") || strings.Contains(logs.String(), "SECRET") {
		t.Fatalf("log of a dead webhook:\n%s", logs.String())
	}
	h := NewWebhook(srv.URL, nil)
	h.Backoff = []time.Duration{time.Millisecond, time.Millisecond}
	defer h.Close()
	h.Send(Event{User: "alice"})
	deadline := time.Now().Add(30 * time.Second)
	for h.Failed() != 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if h.Failed() != 1 || calls.Load() != 3 || h.Sent() != 0 {
		t.Fatalf("failed %d after %d calls, sent %d; want 1 after 3 (1 + 2 retries)", h.Failed(), calls.Load(), h.Sent())
	}
	// The poster now hangs on the next event; fill the queue and more.
	done := make(chan struct{})
	go func() {
		for i := 0; i < queueLen+10; i++ {
			h.Send(Event{User: "bob"})
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Send blocked")
	}
	if h.Failed() < 2 {
		t.Fatalf("a full queue dropped nothing: failed %d", h.Failed())
	}
}

// Links are bounded per user: the oldest go first.
func TestLinksBoundedPerUser(t *testing.T) {
	g := mfa.NewGuard(mfa.Options{}, secrets{"alice": "JBSWY3DPEHPK3PXP"})
	s, err := New(Config{Guard: g, Approvals: mfa.NewApprovals(g), URL: "https://pgmfa.example"})
	if err != nil {
		t.Fatal(err)
	}
	var first string
	for i := 0; i < maxLinksPerUser+5; i++ {
		o, refused := s.Refer(mfa.Login{User: "alice", Addr: "192.0.2.1:5000"})
		if !refused || o.Code != mfa.SQLState || !strings.Contains(o.Hint, "https://pgmfa.example/l/") {
			t.Fatalf("refer: %v %+v", refused, o)
		}
		if i == 0 {
			first = o.Hint[strings.Index(o.Hint, "/l/")+3:][:43]
		}
	}
	if len(s.links) != maxLinksPerUser {
		t.Fatalf("%d links kept", len(s.links))
	}
	if _, ok := s.openLink(first); ok {
		t.Fatal("the oldest link survived")
	}
	if _, err := New(Config{Guard: g, Approvals: mfa.NewApprovals(g), URL: "https://x", Mode: "push"}); err == nil {
		t.Fatal("a bad mode was accepted")
	}
}

type secrets map[string]string

func (s secrets) Secret(user string) (string, bool) { v, ok := s[user]; return v, ok }
