package tlsproxy_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/loop/tlsproxy"
)

// TestCloseEndsSessions: Close ends relayed sessions and logins in every
// state, and every goroutine of the driver returns.
func TestCloseEndsSessions(t *testing.T) {
	plain(t)
	k := certs(t)
	baseline := runtime.NumGoroutine()
	p := startProxy(t, setup{mfaTimeout: time.Hour})
	ctx := context.Background()

	var conns []*pgx.Conn
	for i := 0; i < 3; i++ {
		c, err := pgx.ConnectConfig(ctx, p.pgxConfig(t, "sslmode=require"))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	// A login stuck before its StartupMessage, one stuck inside TLS, and one
	// waiting for an out-of-band approval that never comes.
	raw, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p.port))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tc, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p.port), &tls.Config{RootCAs: k.Pool, ServerName: "localhost", NextProtos: []string{"postgresql"}})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	waitCfg := p.pgxConfig(t, "sslmode=require")
	delete(waitCfg.RuntimeParams, "pgmfa.code")
	waiting := make(chan error, 1)
	go func() {
		c, err := pgx.ConnectConfig(ctx, waitCfg)
		if err == nil {
			c.Close(ctx)
		}
		waiting <- err
	}()
	p.waitLog(t, "login waiting for MFA approval")
	p.waitActive(t, 6)

	p.close()
	if n := p.d.Active(); n != 0 {
		t.Fatalf("%d connections active after Close", n)
	}
	if p.done.Load() != 6 {
		t.Fatalf("done called %d times, want 6", p.done.Load())
	}
	for _, c := range conns {
		if _, err := c.Exec(ctx, "select 1"); err == nil {
			t.Fatal("a session survived Close")
		}
		c.Close(ctx)
	}
	if err := <-waiting; err == nil {
		t.Fatal("the waiting login succeeded")
	}
	raw.Close()
	tc.Close()

	// Serve after Close closes the connection and calls done.
	a, b := net.Pipe()
	called := false
	p.d.Serve(tlsproxy.Handoff{Conn: a}, func() { called = true })
	if _, err := b.Read(make([]byte, 1)); err == nil || !called {
		t.Fatal("Serve after Close did not close at once")
	}

	for i := 0; runtime.NumGoroutine() > baseline; i++ {
		if i > 500 {
			var buf bytes.Buffer
			pprof.Lookup("goroutine").WriteTo(&buf, 1)
			t.Fatalf("%d goroutines, baseline %d:\n%s", runtime.NumGoroutine(), baseline, buf.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestMFATimeoutOverTLS: a login with no code waits for approval and is
// refused with 28000 and the HINT when the wait ends.
func TestMFATimeoutOverTLS(t *testing.T) {
	p := startProxy(t, setup{mfaTimeout: 200 * time.Millisecond})
	cfg := p.pgxConfig(t, "sslmode=require")
	delete(cfg.RuntimeParams, "pgmfa.code")
	_, err := pgx.ConnectConfig(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "was not completed in time") || !strings.Contains(err.Error(), "28000") {
		t.Fatalf("want the MFA timeout refusal, got %v", err)
	}
	p.waitLog(t, "msg=login", "result=refused", "mfa_result=timeout")
}

func TestCertsReload(t *testing.T) {
	k := certs(t)
	dir := t.TempDir()
	cf, kf := dir+"/c.pem", dir+"/k.pem"
	copyFile(t, k.CertFile, cf)
	copyFile(t, k.KeyFile, kf)
	c, err := tlsproxy.LoadCerts(cf, kf)
	if err != nil {
		t.Fatal(err)
	}
	old := c.Current()
	if err := os.WriteFile(cf, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.Reload(); err == nil {
		t.Fatal("Reload accepted garbage")
	}
	if c.Current() != old {
		t.Fatal("a failed Reload replaced the pair")
	}
	copyFile(t, k.CertFile, cf)
	if err := c.Reload(); err != nil {
		t.Fatal(err)
	}
	if c.Current() == old {
		t.Fatal("Reload kept the old pair")
	}
	cfg := c.ServerConfig()
	if cfg.MinVersion != tls.VersionTLS12 || len(cfg.NextProtos) != 1 || cfg.NextProtos[0] != "postgresql" {
		t.Fatalf("server config: min %x, ALPN %q", cfg.MinVersion, cfg.NextProtos)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestHandshakeTimeout: a client that stalls before its StartupMessage, in
// plaintext or inside TLS, is told so and closed.
func TestHandshakeTimeout(t *testing.T) {
	p := startProxy(t, setup{handshakeTimeout: 300 * time.Millisecond})
	k := certs(t)
	addr := fmt.Sprintf("127.0.0.1:%d", p.port)
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tc, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: k.Pool, ServerName: "localhost", NextProtos: []string{"postgresql"}})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	for name, c := range map[string]net.Conn{"plaintext": raw, "tls": tc} {
		fe := pgproto3.NewFrontend(c, c)
		m, err := fe.Receive()
		er, ok := m.(*pgproto3.ErrorResponse)
		if err != nil || !ok || er.Code != "08P01" || !strings.Contains(er.Message, "in time") {
			t.Fatalf("%s: want 08P01, got %#v, %v", name, m, err)
		}
		if _, err := fe.Receive(); err == nil {
			t.Fatalf("%s: connection still open", name)
		}
	}
	if p.dials.Load() != 0 {
		t.Fatal("dialed")
	}
}
