package metrics

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/mfa"
)

// The hooks run on the event loop for every login and session: they must
// not allocate (a Prometheus child's Inc/Observe is an atomic add).
func TestHooksDoNotAllocate(t *testing.T) {
	m := New("test")
	st := login.Stats{Mode: login.ModeSockmap, ClientToServer: 10, ServerToClient: 20}
	n := testing.AllocsPerRun(1000, func() {
		m.Login(true, mfa.PathCode, "", time.Millisecond)
		m.Login(false, "", mfa.ReasonThrottled, time.Millisecond)
		m.MFAWaited(login.WaitApproved, time.Second)
		m.SessionOpened(login.ModeSockmap)
		m.SessionClosed(login.ModeSockmap)
		m.SessionEnded(st)
		m.StoreCall(mfa.StoreOpClaimStep, time.Millisecond, nil)
	})
	if n != 0 {
		t.Fatalf("%v allocations per login", n)
	}
}

// Values outside the known sets land in their bounded catch-all, never in
// a new series.
func TestLabelsStayBounded(t *testing.T) {
	m := New("test")
	before := testutil.CollectAndCount(m.reg)
	m.Login(false, mfa.Path("something-new"), "a reason nobody knows", time.Millisecond)
	m.MFAWaited("unknown", time.Second)
	m.SessionOpened("carrier pigeon")
	m.SessionEnded(login.Stats{Mode: "carrier pigeon", ClientToServer: 1})
	m.StoreCall("drop_table", time.Millisecond, errors.New("x"))
	m.SpliceFallback(errors.New("bpf: something new"))
	if after := testutil.CollectAndCount(m.reg); after != before {
		t.Fatalf("%d series before, %d after unknown values", before, after)
	}
	for name, want := range map[string]float64{
		`pgmfa_logins_total{mfa="none",result="refused"}`:                      1,
		`pgmfa_mfa_refusals_total{reason="other"}`:                             1,
		`pgmfa_splice_fallbacks_total{reason="other"}`:                         1,
		`pgmfa_sessions_open{mode="sockmap"}`:                                  0,
		`pgmfa_session_bytes_total{direction="client_to_server",mode="relay"}`: 0,
	} {
		if got := sample(t, m, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// sample reads one series from a scrape of m.
func sample(t *testing.T, m *Metrics, series string) float64 {
	t.Helper()
	srv := httptestServer(t, m)
	resp, err := http.Get(srv + Path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("no series %s in\n%s", series, body)
	return 0
}

func httptestServer(t *testing.T, m *Metrics) string {
	t.Helper()
	ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := m.Server()
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	return "http://" + ln.Addr().String()
}

// The unix-socket form serves the same handler; a live socket is not
// taken over and a stale one is replaced.
func TestListenUnix(t *testing.T) {
	path := filepath.Join(t.TempDir(), "metrics.sock")
	m := New("test")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	s := m.Server()
	go s.Serve(ln)
	defer s.Close()
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode: %v %v", fi.Mode(), err)
	}
	if _, err := Listen(path); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second listener on a live socket: %v", err)
	}
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
	for p, code := range map[string]int{Path: 200, "/": 404, "/metrics/x": 404} {
		resp, err := c.Get("http://pgmfa" + p)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != code || (code == 200) != strings.Contains(string(body), "pgmfa_build_info") {
			t.Errorf("GET %s: %d, want %d\n%.200s", p, resp.StatusCode, code, body)
		}
	}

	// A socket file nobody listens on (a process that died) is replaced.
	s.Close()
	stale := filepath.Join(t.TempDir(), "stale.sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: stale}); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	ln, err = Listen(stale)
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	ln.Close()
	if err := os.WriteFile(stale, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(stale); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("a regular file: %v", err)
	}
}

// fallbackReason against the errors a real splicer returns: a socket that
// is not TCP, a peer that already closed, a splicer that was closed.
func TestFallbackReasons(t *testing.T) {
	if err := bpf.Probe(); err != nil {
		pgtest.SkipOrFail(t, "kernel splicing unavailable: %v", err)
	}
	sp, err := bpf.NewSplicer(bpf.Options{})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			sp.Close()
		}
	}()
	pair := func() (client, server int) {
		t.Helper()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		dup := func(c net.Conn) int {
			f, err := c.(*net.TCPConn).File()
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
			t.Cleanup(func() { f.Close() })
			return int(f.Fd())
		}
		return dup(c), dup(s)
	}

	// The client has closed: its socket has received FIN (CLOSE_WAIT).
	c, s := pair()
	if err := unix.Shutdown(s, unix.SHUT_WR); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		info, err := unix.GetsockoptTCPInfo(c, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			t.Fatal(err)
		}
		if info.State == 8 { // TCP_CLOSE_WAIT
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the FIN did not arrive (state %d)", info.State)
		}
	}
	_, s2 := pair()
	err = sp.Splice(c, s2, nil, nil, func(bpf.Stats) {})
	if got := fallbackReason(err); err == nil || got != FallbackPeerClosed {
		t.Errorf("a client that already closed: %v → %q, want %q", err, got, FallbackPeerClosed)
	}

	udp, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(udp)
	_, s = pair()
	err = sp.Splice(udp, s, nil, nil, func(bpf.Stats) {})
	if got := fallbackReason(err); err == nil || got != FallbackOther {
		t.Errorf("a UDP client: %v → %q, want %q", err, got, FallbackOther)
	}

	sp.Close()
	closed = true
	c, s = pair()
	err = sp.Splice(c, s, nil, nil, func(bpf.Stats) {})
	if got := fallbackReason(err); got != FallbackShutdown {
		t.Errorf("a closed splicer: %v → %q, want %q", err, got, FallbackShutdown)
	}
	if got := fallbackReason(&net.OpError{Op: "write", Err: syscall.EPIPE}); got != FallbackPeerClosed {
		t.Errorf("EPIPE writing the read-ahead → %q", got)
	}
}

// The webhook's counts are read at scrape time, and the web paths and
// reasons are series of their own.
func TestWebhookAndWebSeries(t *testing.T) {
	m := New("test")
	var sent, failed uint64 = 3, 1
	m.Webhook(func() uint64 { return sent }, func() uint64 { return failed })
	m.WebSignIns(func(method string, ok bool) uint64 {
		if method == "passkey" && !ok {
			return 2
		}
		if method == "totp" && ok {
			return 5
		}
		return 0
	})
	m.Login(true, mfa.PathWeb, "", time.Millisecond)
	m.Login(false, mfa.PathWeb, mfa.ReasonWebLink, time.Millisecond)
	m.Login(false, mfa.PathApproval, mfa.ReasonDenied, time.Millisecond)
	sent = 4
	for name, want := range map[string]float64{
		`pgmfa_mfa_webhook_sent_total`:                               4,
		`pgmfa_mfa_webhook_failed_total`:                             1,
		`pgmfa_logins_total{mfa="web",result="ok"}`:                  1,
		`pgmfa_logins_total{mfa="web",result="refused"}`:             1,
		`pgmfa_mfa_refusals_total{reason="web_link"}`:                1,
		`pgmfa_mfa_refusals_total{reason="denied"}`:                  1,
		`pgmfa_mfa_refusals_total{reason="other"}`:                   0,
		`pgmfa_web_signins_total{method="passkey",result="refused"}`: 2,
		`pgmfa_web_signins_total{method="totp",result="ok"}`:         5,
		`pgmfa_web_signins_total{method="passkey",result="ok"}`:      0,
	} {
		if got := sample(t, m, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}
