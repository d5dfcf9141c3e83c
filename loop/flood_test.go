package loop_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

// flood is n plain TCP connections to the proxy that send nothing and read
// whatever the proxy says (an over-the-limit refusal is recorded); release
// closes them all.
type flood struct {
	mu      sync.Mutex
	conns   []net.Conn
	refused atomic.Int64 // got an ErrorResponse with 53300
	closed  atomic.Int64 // the proxy closed the connection
	failed  atomic.Int64 // the dial itself failed
	wg      sync.WaitGroup
}

func startFlood(addr string, n, wave int) *flood {
	f := &flood{}
	var dials sync.WaitGroup
	per := (n + 7) / 8
	for g := 0; g < 8; g++ {
		dials.Add(1)
		go func() {
			defer dials.Done()
			for i := 0; i < per; i++ {
				// Every wave from its own source address: the flood's
				// closed connections (TIME_WAIT) never take the ports a
				// later wave or a login needs.
				d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 9, byte(wave>>8), byte(wave%250+1))}}
				c, err := d.Dial("tcp", addr)
				if err != nil {
					f.failed.Add(1)
					continue
				}
				f.mu.Lock()
				f.conns = append(f.conns, c)
				f.mu.Unlock()
				f.wg.Add(1)
				go func() {
					defer f.wg.Done()
					var got []byte
					buf := make([]byte, 512)
					for {
						k, err := c.Read(buf)
						got = append(got, buf[:k]...)
						if err != nil {
							break
						}
					}
					if len(got) > 0 && got[0] == 'E' && bytes.Contains(got, []byte("C53300\x00")) {
						f.refused.Add(1)
					}
					f.closed.Add(1)
				}()
			}
		}()
	}
	dials.Wait()
	return f
}

func (f *flood) release() {
	f.mu.Lock()
	for _, c := range f.conns {
		c.Close()
	}
	f.conns = nil
	f.mu.Unlock()
	f.wg.Wait()
}

// TestConnectionFloodAtFDLimit: a flood of idle connections larger than
// the proxy's open-file limit neither stops the proxy nor makes a real
// login hang or fail for another reason than 53300; once the flood ends the
// proxy serves normally and exits 0 on SIGTERM. Run with the default
// --max-conns (derived from the limit: the flood is refused with 53300
// before the descriptors run out) and with a --max-conns far above what the
// limit allows (accept hits EMFILE and must back off, not exit).
// PGMFA_SOAK=1 repeats flood waves for minutes.
func TestConnectionFloodAtFDLimit(t *testing.T) {
	const nofile = 512
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"default max-conns", nil},
		{"max-conns above the fd limit", []string{"--max-conns", "100000"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startServe(t, nofile, tc.args...)
			if err := p.login(20 * time.Second); err != nil {
				t.Fatalf("login before the flood: %v", err)
			}
			waves, soakUntil := 1, time.Time{}
			if os.Getenv("PGMFA_SOAK") != "" {
				soakUntil = time.Now().Add(3 * time.Minute)
			}
			for wave := 0; wave < waves || time.Now().Before(soakUntil); wave++ {
				f := startFlood(p.addr(), 2*nofile, wave)
				// A real login during the flood gets in or is refused with
				// 53300; it neither hangs nor fails otherwise.
				for i := 0; i < 3; i++ {
					err := p.login(20 * time.Second)
					if err != nil && tc.args != nil && strings.Contains(err.Error(), "connection reset by peer") {
						// Known gap with --max-conns above the fd limit:
						// when the reserve descriptor is already spent, a
						// connection can be reset instead of answered
						// 53300 (seen once in CI). The proxy must live on;
						// checked below. The default --max-conns is strict.
						t.Logf("wave %d: login during the flood was reset (known gap above the fd limit)", wave)
						continue
					}
					if err != nil && !isTooMany(err) {
						f.release()
						t.Fatalf("wave %d: login during the flood: want success or 53300, got %v (proxy alive: %v)", wave, err, p.alive())
					}
				}
				if !p.alive() {
					f.release()
					t.Fatalf("wave %d: the proxy exited during the flood: %v", wave, p.waitErr)
				}
				if tc.args == nil && f.refused.Load() == 0 {
					f.release()
					t.Fatalf("wave %d: no flood connection was refused with 53300 (closed %d, dial failures %d)", wave, f.closed.Load(), f.failed.Load())
				}
				f.release()
				// The flood is over: logins work again.
				var last error
				if !eventually(30*time.Second, func() bool { last = p.login(10 * time.Second); return last == nil }) {
					t.Fatalf("wave %d: login after the flood: %v (proxy alive: %v)", wave, last, p.alive())
				}
			}
			if tc.args != nil && !strings.Contains(p.logs.String(), "too many open files") {
				t.Errorf("the flood never made accept fail with EMFILE; the test did not test what it should")
			}
			if strings.Contains(p.logs.String(), "exiting due to error") {
				t.Errorf("an event loop exited during the flood")
			}
			if code := p.stop(); code != 0 {
				t.Fatalf("exit status after SIGTERM: %d", code)
			}
		})
	}
}

// TestStartupTimeout: a connection that sends no StartupMessage is closed
// after --startup-timeout (plaintext, or after its SSLRequest was answered
// 'S'); once the StartupMessage is in, the login has the rest of the
// (longer) handshake timeout.
func TestStartupTimeout(t *testing.T) {
	pki := newPKICerts(t)
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) {
		c.StartupTimeout = 300 * time.Millisecond
		c.TLSCerts, c.TLSMode = pki.certs, session.TLSAllow
	})
	closedWithin := func(c net.Conn, d time.Duration) bool {
		_ = c.SetReadDeadline(time.Now().Add(d))
		for {
			if _, err := c.Read(make([]byte, 512)); err != nil {
				var ne net.Error
				return !(errors.As(err, &ne) && ne.Timeout())
			}
		}
	}
	idle := dialRaw(t, p)
	if !closedWithin(idle.conn, 10*time.Second) {
		t.Fatal("an idle connection outlived the startup timeout")
	}
	tlsIdle := dialRaw(t, p)
	tlsIdle.write(proto.Append(nil, &pgproto3.SSLRequest{}))
	one := make([]byte, 1)
	if _, err := io.ReadFull(tlsIdle.conn, one); err != nil || one[0] != 'S' {
		t.Fatalf("SSLRequest: %q %v", one, err)
	}
	if !closedWithin(tlsIdle.conn, 10*time.Second) {
		t.Fatal("a connection idle after 'S' outlived the startup timeout")
	}
	// A slow login past the startup timeout, with its StartupMessage in time.
	c := dialRaw(t, p)
	scramLogin(t, c, svc, svcPW, "", func(final []byte) {
		time.Sleep(time.Second)
		c.write(final)
	})
	for {
		m, err := c.next()
		if err != nil {
			t.Fatalf("slow login: %v", err)
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			t.Fatalf("slow login: %+v", e)
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
}
