package loop_test

import (
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/proto"
)

// TestNegotiationFloodMemory: clients that send SSLRequest and
// GSSENCRequest over and over and never read what the proxy answers must
// not make it buffer: the proxy's RSS stays within a few MiB of where it
// started, and real logins work throughout. (Before, every request was
// answered 'N' into gnet's outbound list: GBs in seconds.)
// PGMFA_SOAK=1 runs the flood for minutes instead of seconds.
func TestNegotiationFloodMemory(t *testing.T) {
	// Small socket buffers (the client's below, the proxy's here) make
	// unread answers back up into the proxy after KiBs, not MiBs: seconds
	// of flood show what minutes would with the defaults.
	p := startServe(t, 0, "--socket-buffer", "8192")
	for i := 0; i < 3; i++ {
		if err := p.login(20 * time.Second); err != nil {
			t.Fatalf("warm-up login: %v", err)
		}
	}
	time.Sleep(500 * time.Millisecond)
	base := rssKiB(t, p.pid())

	run := 3 * time.Second
	if os.Getenv("PGMFA_SOAK") != "" {
		run = 3 * time.Minute
	}
	const limitKiB = 8 << 10 // "a few MiB": the logins and flood goroutines cost 2-4 MiB
	// One 64 KiB burst of alternating requests.
	var burst []byte
	for len(burst) < 64<<10 {
		burst = proto.Append(burst, &pgproto3.SSLRequest{}, &pgproto3.GSSEncRequest{})
	}

	stop := make(chan struct{})
	var conns, written atomic.Int64
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			// A small receive buffer, as an attacker would choose: the
			// proxy's answers back up after a few KiB instead of MiBs.
			smallRcvbuf := func(_, _ string, rc syscall.RawConn) error {
				return rc.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
			}
			n := 0
			for {
				select {
				case <-stop:
					return
				default:
				}
				// Each connection from another source address, so that
				// the ones the proxy closes (TIME_WAIT) cannot run the
				// ports out in a long run.
				n++
				d := net.Dialer{Timeout: 3 * time.Second, Control: smallRcvbuf,
					LocalAddr: &net.TCPAddr{IP: net.IPv4(127, byte(1+g), byte(n>>8), byte(n%250+1))}}
				c, err := d.Dial("tcp", p.addr())
				if err != nil {
					time.Sleep(10 * time.Millisecond)
					continue
				}
				conns.Add(1)
				// Write until the proxy hangs up (or the test ends);
				// never read.
				done := make(chan struct{})
				go func() {
					select {
					case <-stop:
					case <-done:
					}
					c.Close()
				}()
				for {
					_ = c.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
					k, err := c.Write(burst)
					written.Add(int64(k))
					if err != nil {
						if ne, ok := err.(net.Error); ok && ne.Timeout() {
							select {
							case <-stop:
							default:
								continue // the proxy is not reading: keep the pressure on
							}
						}
						break
					}
				}
				close(done)
				time.Sleep(2 * time.Millisecond)
			}
		}(g)
	}

	var maxRSS int64
	deadline := time.Now().Add(run)
	nextLogin := time.Now()
	failed := ""
	for time.Now().Before(deadline) && failed == "" {
		if r := rssKiB(t, p.pid()); r > maxRSS {
			maxRSS = r
		}
		if maxRSS-base > limitKiB {
			failed = "rss"
			break
		}
		if time.Now().After(nextLogin) {
			if err := p.login(20 * time.Second); err != nil {
				failed = "login: " + err.Error()
				break
			}
			nextLogin = time.Now().Add(500 * time.Millisecond)
		}
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("RSS %d KiB at the start, at most %d KiB during the flood (%d flood connections, %d MiB of requests)", base, maxRSS, conns.Load(), written.Load()>>20)
	switch {
	case failed == "rss":
		t.Fatalf("the proxy's RSS grew from %d KiB to %d KiB under a negotiation flood (bound %d KiB)", base, maxRSS, limitKiB)
	case failed != "":
		t.Fatalf("during the flood, %s", failed)
	}
	if err := p.login(20 * time.Second); err != nil {
		t.Fatalf("login after the flood: %v", err)
	}
}
