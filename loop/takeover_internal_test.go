package loop

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bpf/fdpass"
)

// TestTakeoverPeerDiesWithTheListeners: a new process that receives the
// listeners and dies before answering (or answers with a refusal) leaves
// the old one accepting on them again, and a client that connected while
// no one accepted is served, not refused: the accept queue survived.
func TestTakeoverPeerDiesWithTheListeners(t *testing.T) {
	var logs syncBuf
	s, err := New(Config{
		Listen:   []string{"127.0.0.1:0"},
		Upstream: "127.0.0.1:1", // nothing there: a login ends with an error message, which is the answer we wait for
		Loops:    1,
		Splice:   SpliceOff,
		Logger:   slog.New(slog.NewTextHandler(&logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	// Listen on port 0 and keep it: a takeover compares the addresses as
	// configured.
	done := make(chan error, 1)
	go func() { done <- s.Run() }()
	<-s.Ready()
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = s.Stop(t.Context())
		<-done
	}()
	addr := s.acc.lns[0].Addr().String()
	path := filepath.Join(t.TempDir(), "takeover.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	go s.ServeTakeovers(ln, 5*time.Second)
	defer ln.Close()

	for _, answer := range []string{"dies", "refuses"} {
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		if err := writeMagic(c); err != nil {
			t.Fatal(err)
		}
		if err := writeMsg(c, &takeoverMsg{Version: takeoverVersion, Listen: s.addrs}, nil); err != nil {
			t.Fatal(err)
		}
		if err := readMagic(c); err != nil {
			t.Fatal(err)
		}
		hello, fds, err := readMsg(c, 4)
		if err != nil || len(fds) != 1 || hello.Error != "" {
			t.Fatalf("%s: hello %+v, %d fds, %v", answer, hello, len(fds), err)
		}
		// Nobody accepts now: this client waits in the queue.
		client, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		if answer == "refuses" {
			_ = writeMsg(c, &takeoverMsg{Error: "not today"}, nil)
		}
		unix.Close(fds[0])
		c.Close()
		// Served by the old process again: a StartupMessage gets an
		// answer (the database is unreachable: an ErrorResponse).
		startup := binary.BigEndian.AppendUint32(nil, 0)
		startup = binary.BigEndian.AppendUint32(startup, 196608)
		startup = append(startup, "user\x00alice\x00\x00"...)
		binary.BigEndian.PutUint32(startup, uint32(len(startup)))
		_ = client.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := client.Write(startup); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 1)
		if _, err := io.ReadFull(client, b); err != nil || b[0] != 'E' {
			t.Fatalf("%s: the client queued during the takeover got %q, %v:\n%s", answer, b, err, logs.String())
		}
		client.Close()
	}
	// The failure is logged after the listeners are accepting again, so
	// the last client can have its answer a moment before the line.
	failures := func() int { return strings.Count(logs.String(), "takeover failed; this process serves on as before") }
	for deadline := time.Now().Add(5 * time.Second); failures() < 2 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if n := failures(); n != 2 {
		t.Fatalf("%d takeover failures logged, want 2:\n%s", n, logs.String())
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the takeover socket is gone after failed takeovers: %v", err)
	}
}

// TestTakeoverFailsDuringDrainRequest: a Drain (SIGTERM) asked while a
// takeover runs waits for it; when the takeover fails, the drain runs.
func TestTakeoverFailsDuringDrainRequest(t *testing.T) {
	var logs syncBuf
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, Upstream: "127.0.0.1:1", Loops: 1, Splice: SpliceOff,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run() }()
	<-s.Ready()
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "takeover.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go s.ServeTakeovers(ln, 5*time.Second)
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	_ = writeMagic(c)
	_ = writeMsg(c, &takeoverMsg{Version: takeoverVersion, Listen: s.addrs}, nil)
	if err := readMagic(c); err != nil {
		t.Fatal(err)
	}
	_, fds, err := readMsg(c, 4)
	if err != nil {
		t.Fatal(err)
	}
	fdpass.CloseAll(fds)
	res := s.Drain(5 * time.Second) // returns at once: the takeover decides
	if res.Sessions != 0 || res.Logins != 0 || !strings.Contains(logs.String(), "drains once it ends") {
		t.Fatalf("Drain during a takeover: %+v\n%s", res, logs.String())
	}
	_ = writeMsg(c, &takeoverMsg{Error: "no"}, nil)
	c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the server did not drain after the failed takeover:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "drain finished") {
		t.Fatalf("no drain:\n%s", logs.String())
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// FuzzTakeoverFrame: a frame of the takeover protocol, whatever its
// bytes, is parsed or refused without a panic, and what parses encodes
// back to a frame that parses the same.
func FuzzTakeoverFrame(f *testing.F) {
	f.Add([]byte(`{"version":1,"listen":["tcp://127.0.0.1:6432"],"pid":7}`))
	f.Add([]byte(`{"next_id":40,"listen":["unix:///run/x"]}`))
	f.Add([]byte(`{"splicer":true}`))
	f.Add([]byte(`{"ok":true} {}`))
	f.Add([]byte(`{"error":"no","unknown":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = decodeMeta(b)
		m, err := parseMsg(bytes.NewReader(b), uint32(len(b)))
		if err != nil {
			return
		}
		enc, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		m2, err := parseMsg(bytes.NewReader(enc), uint32(len(enc)))
		if err != nil {
			t.Fatalf("%s parsed, its encoding %s does not: %v", b, enc, err)
		}
		if enc2, _ := json.Marshal(m2); !bytes.Equal(enc, enc2) {
			t.Fatalf("%s → %s → %s", b, enc, enc2)
		}
	})
}
