package admin

import (
	"context"
	"errors"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeSessions is a Sessions with one session, recording kills.
type fakeSessions struct {
	mu     sync.Mutex
	live   map[uint64]Session
	killed []uint64
}

func (f *fakeSessions) List() []Session {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Session
	for _, s := range f.live {
		out = append(out, s)
	}
	return out
}

func (f *fakeSessions) Kill(id uint64) (Session, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.live[id]
	if !ok {
		return Session{}, ErrNoSession
	}
	delete(f.live, id)
	f.killed = append(f.killed, id)
	return s, nil
}

// TestSessionsAPI: the sessions endpoints list and kill through Sessions;
// an unknown id is 404 no_session and kills nothing; a proxy without
// SetSessions answers 404; over TCP the token is required as everywhere.
func TestSessionsAPI(t *testing.T) {
	f := start(t, filepath.Join(t.TempDir(), "admin.sock"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var e *Error
	if _, err := f.cl.ListSessions(ctx); !errors.As(err, &e) || e.Status != http.StatusNotFound || e.Reason != "no_sessions" {
		t.Fatalf("without SetSessions: %v", err)
	}
	fs := &fakeSessions{live: map[uint64]Session{7: {ID: 7, User: "alice", Mode: "sockmap", ClientToServer: 10, ServerToClient: 20}}}
	f.srv.SetSessions(fs)
	list, err := f.cl.ListSessions(ctx)
	if err != nil || len(list) != 1 || list[0].ID != 7 || list[0].ServerToClient != 20 {
		t.Fatalf("list: %+v, %v", list, err)
	}
	if _, err := f.cl.KillSession(ctx, 8); !errors.As(err, &e) || e.Status != http.StatusNotFound || e.Reason != "no_session" || !strings.Contains(e.Message, "8") {
		t.Fatalf("kill of an unknown id: %v", err)
	}
	if len(fs.killed) != 0 {
		t.Fatalf("an unknown id killed %v", fs.killed)
	}
	ended, err := f.cl.KillSession(ctx, 7)
	if err != nil || ended.ID != 7 || len(fs.killed) != 1 {
		t.Fatalf("kill 7: %+v, %v (killed %v)", ended, err, fs.killed)
	}
	if !strings.Contains(f.logs.String(), "admin session kill") {
		t.Fatalf("the kill is not logged:\n%s", f.logs.String())
	}

	tcp := start(t, "127.0.0.1:0")
	tcp.srv.SetSessions(fs)
	noToken := Client{Addr: tcp.addr}
	if _, err := noToken.ListSessions(ctx); !errors.As(err, &e) || e.Status != http.StatusUnauthorized {
		t.Fatalf("list over TCP without the token: %v", err)
	}
	if _, err := tcp.cl.ListSessions(ctx); err != nil {
		t.Fatalf("list over TCP with the token: %v", err)
	}
}
