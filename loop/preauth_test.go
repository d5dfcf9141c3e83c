package loop_test

import (
	"crypto/tls"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

// TestRepeatedNegotiationRequests: one SSLRequest and one GSSENCRequest per
// connection; a second one of either is refused the way PostgreSQL refuses
// it (0A000, "unsupported frontend protocol") and the connection closed.
func TestRepeatedNegotiationRequests(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	for _, tc := range []struct {
		name string
		seq  []pgproto3.FrontendMessage
	}{
		{"SSLRequest twice", []pgproto3.FrontendMessage{&pgproto3.SSLRequest{}, &pgproto3.SSLRequest{}}},
		{"GSSENCRequest twice", []pgproto3.FrontendMessage{&pgproto3.GSSEncRequest{}, &pgproto3.GSSEncRequest{}}},
		{"SSL, GSS, SSL", []pgproto3.FrontendMessage{&pgproto3.SSLRequest{}, &pgproto3.GSSEncRequest{}, &pgproto3.SSLRequest{}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRaw(t, p)
			last := len(tc.seq) - 1
			for i, m := range tc.seq {
				c.write(proto.Append(nil, m))
				if i == last {
					break
				}
				one := make([]byte, 1)
				if _, err := io.ReadFull(c.conn, one); err != nil || one[0] != 'N' {
					t.Fatalf("request %d: want 'N', got %q %v", i+1, one, err)
				}
			}
			e := c.expectRefusal()
			if e == nil || e.Code != "0A000" || !strings.Contains(e.Message, "unsupported frontend protocol") {
				t.Fatalf("repeated request: want 0A000 unsupported frontend protocol, got %+v", e)
			}
			if _, err := c.conn.Read(make([]byte, 1)); err == nil {
				t.Fatal("the connection stayed open after the refusal")
			}
		})
	}
	// A login after both requests still works.
	c := dialRaw(t, p)
	for _, m := range []pgproto3.FrontendMessage{&pgproto3.GSSEncRequest{}, &pgproto3.SSLRequest{}} {
		c.write(proto.Append(nil, m))
		one := make([]byte, 1)
		if _, err := io.ReadFull(c.conn, one); err != nil || one[0] != 'N' {
			t.Fatalf("want 'N', got %q %v", one, err)
		}
	}
	scramLogin(t, c, svc, svcPW, "", func(final []byte) { c.write(final) })
	for {
		m, err := c.next()
		if err != nil {
			t.Fatalf("login after GSSENCRequest and SSLRequest: %v", err)
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			t.Fatalf("login after GSSENCRequest and SSLRequest: %+v", e)
		}
	}
}

// TestSilentPeerCannotGrowTheProxy: a client that reads nothing cannot make
// the proxy buffer what the database sends during the login — neither what
// is forwarded before the database's AuthenticationOk (NoticeResponses)
// nor what is held after it while MFA waits. The proxy hangs up instead.
func TestSilentPeerCannotGrowTheProxy(t *testing.T) {
	notice := proto.Append(nil, &pgproto3.NoticeResponse{Severity: "NOTICE", Code: "00000", Message: strings.Repeat("x", 1000)})
	const limit = 64 << 20
	for _, tc := range []struct {
		name   string
		authOk bool
		tls    bool
	}{
		{"forwarded before AuthenticationOk", false, false},
		{"held after AuthenticationOk", true, false},
		{"held after AuthenticationOk, TLS client", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := startFakeDB(t, func(c net.Conn, db *fakeDB) error {
				_ = c.(*net.TCPConn).SetWriteBuffer(64 << 10)
				if tc.authOk {
					if _, err := c.Write(proto.Append(nil, &pgproto3.AuthenticationOk{})); err != nil {
						return err
					}
				}
				return db.stream(c, notice, limit)
			})
			var pki *pkiCerts
			if tc.tls {
				pki = newPKICerts(t)
			}
			p := startProxy(t, mfa.Options{}, func(c *loop.Config) {
				c.Upstream = db.ln.Addr().String()
				c.SocketBuf = 64 << 10
				if pki != nil {
					c.TLSCerts, c.TLSMode = pki.certs, session.TLSAllow
				}
			})
			conn, err := net.Dial("tcp", net.JoinHostPort(p.host, strconv.Itoa(p.port)))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.(*net.TCPConn).SetReadBuffer(16 << 10)
			var cc net.Conn = conn
			if tc.tls {
				if _, err := conn.Write(proto.Append(nil, &pgproto3.SSLRequest{})); err != nil {
					t.Fatal(err)
				}
				one := make([]byte, 1)
				if _, err := io.ReadFull(conn, one); err != nil || one[0] != 'S' {
					t.Fatalf("SSLRequest: %q %v", one, err)
				}
				tc := tls.Client(conn, &tls.Config{InsecureSkipVerify: true})
				if err := tc.Handshake(); err != nil {
					t.Fatal(err)
				}
				cc = tc
			}
			// alice without a code: after AuthenticationOk the login waits
			// for an approval, holding what the database says.
			if _, err := cc.Write(rawStartupPacket("user", alice, "database", "app")); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-db.done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(60 * time.Second):
				t.Fatalf("the proxy neither hung up nor stopped reading (%d bytes taken)", db.written.Load())
			}
			t.Logf("the proxy hung up after %d bytes from the database", db.written.Load())
			if !tc.authOk {
				return // the client's unread backlog may end it first
			}
			// The login machine's bound (session.Config.MaxFromUpstream,
			// 4 MiB by default), the same through both drivers: never
			// before it. Through the loop, past it by no more than the
			// sockets (--socket-buffer) and one read hold; the TLS driver
			// dials the database without --socket-buffer, so there the
			// kernel may buffer up to tcp_rmem's maximum on top.
			if w := db.written.Load(); w <= 4<<20 || (!tc.tls && w > 5<<20) {
				t.Errorf("the proxy hung up after %d bytes; the bound is 4 MiB", w)
			}
			_ = cc.SetReadDeadline(time.Now().Add(20 * time.Second))
			got, _ := io.ReadAll(cc)
			msg, _, err := proto.NextMessage(got, 1<<20)
			var e pgproto3.ErrorResponse
			if err != nil || msg.Type != 'E' || e.Decode(msg.Body) != nil || e.Code != "08006" ||
				e.Message != session.ErrUpstreamOverLimit.Error() {
				t.Errorf("the client got %q, want 08006 %q", got, session.ErrUpstreamOverLimit)
			}
		})
	}
}
