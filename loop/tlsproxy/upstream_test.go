package tlsproxy_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmfa/pgmfa/loop/tlsproxy"
)

// TestUpstreamTLS: a plaintext client (the driver runs the connection from
// its first byte) through TLS towards the database, per sslmode.
func TestUpstreamTLS(t *testing.T) {
	k := certs(t)
	sslpg, plainpg := withSSL(t), plain(t)
	cases := []struct {
		name    string
		up      tlsproxy.UpstreamTLS
		plainPG bool
		wantSSL string // "t"/"f" from pg_stat_ssl, or "" for a refusal
		wantErr []string
	}{
		{name: "verify-full", up: tlsproxy.UpstreamTLS{SSLMode: "verify-full", RootCert: k.CAFile}, wantSSL: "t"},
		{name: "verify-ca", up: tlsproxy.UpstreamTLS{SSLMode: "verify-ca", RootCert: k.CAFile, ServerName: "elsewhere"}, wantSSL: "t"},
		{name: "require", up: tlsproxy.UpstreamTLS{SSLMode: "require"}, wantSSL: "t"},
		{name: "prefer-ssl", up: tlsproxy.UpstreamTLS{SSLMode: "prefer"}, wantSSL: "t"},
		{name: "verify-full-wrong-ca", up: tlsproxy.UpstreamTLS{SSLMode: "verify-full", RootCert: k.OtherCAFile},
			wantErr: []string{"certificate signed by unknown authority", "--upstream-sslrootcert"}},
		{name: "require-with-wrong-ca", up: tlsproxy.UpstreamTLS{SSLMode: "require", RootCert: k.OtherCAFile},
			wantErr: []string{"certificate signed by unknown authority"}},
		{name: "verify-full-wrong-name", up: tlsproxy.UpstreamTLS{SSLMode: "verify-full", RootCert: k.CAFile, ServerName: "db.example"},
			wantErr: []string{"db.example"}},
		{name: "require-against-ssl-off", up: tlsproxy.UpstreamTLS{SSLMode: "require"}, plainPG: true,
			wantErr: []string{"server does not support SSL, but sslmode=require"}},
		{name: "prefer-against-ssl-off", up: tlsproxy.UpstreamTLS{SSLMode: "prefer"}, plainPG: true, wantSSL: "f"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pg := sslpg
			if tc.plainPG {
				pg = plainpg
			}
			p := startProxy(t, setup{noCerts: true, pg: pg, upTLS: tc.up})
			ctx := context.Background()
			conn, err := pgx.ConnectConfig(ctx, p.pgxConfig(t, "sslmode=disable"))
			if tc.wantSSL == "" {
				var pe *pgconn.PgError
				if !errors.As(err, &pe) || pe.Code != "08006" {
					t.Fatalf("want 08006, got %v", err)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(pe.Message, w) {
						t.Errorf("message %q lacks %q", pe.Message, w)
					}
				}
				t.Logf("client saw: %s", pe.Message)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			var ssl bool
			if err := conn.QueryRow(ctx, "select ssl from pg_stat_ssl where pid = pg_backend_pid()").Scan(&ssl); err != nil {
				t.Fatal(err)
			}
			if got := map[bool]string{true: "t", false: "f"}[ssl]; got != tc.wantSSL {
				t.Fatalf("database side ssl=%s, want %s", got, tc.wantSSL)
			}
		})
	}
}

func TestDialerConfigErrors(t *testing.T) {
	k := certs(t)
	unix := &net.UnixAddr{Name: "/run/postgresql/.s.PGSQL.5432", Net: "unix"}
	tcp := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5432}
	for _, tc := range []struct {
		addr net.Addr
		up   tlsproxy.UpstreamTLS
		want string
	}{
		{unix, tlsproxy.UpstreamTLS{SSLMode: "require"}, "unix socket"},
		{unix, tlsproxy.UpstreamTLS{SSLMode: "verify-full", RootCert: k.CAFile}, "unix socket"},
		{tcp, tlsproxy.UpstreamTLS{SSLMode: "bogus"}, "must be disable, prefer"},
		{tcp, tlsproxy.UpstreamTLS{SSLMode: "verify-full"}, "needs --upstream-sslrootcert"},
		{tcp, tlsproxy.UpstreamTLS{SSLMode: "verify-ca", RootCert: "/nonexistent"}, "--upstream-sslrootcert"},
		{tcp, tlsproxy.UpstreamTLS{SSLMode: "require", Cert: k.CertFile}, "go together"},
		{tcp, tlsproxy.UpstreamTLS{SSLMode: "prefer", SSLNegotiation: "direct"}, "needs --upstream-sslmode require"},
		{tcp, tlsproxy.UpstreamTLS{SSLNegotiation: "direct"}, "needs --upstream-sslmode require"},
		{tcp, tlsproxy.UpstreamTLS{SSLMode: "require", SSLNegotiation: "bogus"}, "postgres or direct"},
	} {
		_, err := tlsproxy.Dialer(tc.addr, tc.up, 0)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v %+v: want %q, got %v", tc.addr, tc.up, tc.want, err)
		}
	}
	for _, mode := range []string{"", "disable", "prefer"} {
		if _, err := tlsproxy.Dialer(unix, tlsproxy.UpstreamTLS{SSLMode: mode}, 0); err != nil {
			t.Errorf("unix with sslmode %q: %v", mode, err)
		}
	}
	if (tlsproxy.UpstreamTLS{}).NeedsDriver() || (tlsproxy.UpstreamTLS{SSLMode: "disable"}).NeedsDriver() ||
		!(tlsproxy.UpstreamTLS{SSLMode: "prefer"}).NeedsDriver() {
		t.Error("NeedsDriver")
	}
}

// --socket-buffer reaches the database socket the driver dials, before
// connect (the kernel reports twice what was asked: its bookkeeping share).
func TestDialerSocketBuffer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	for _, buf := range []int{0, 96 << 10} {
		dial, err := tlsproxy.Dialer(ln.Addr(), tlsproxy.UpstreamTLS{SSLMode: "disable"}, buf)
		if err != nil {
			t.Fatal(err)
		}
		c, err := dial(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		rc, _ := c.(*net.TCPConn).SyscallConn()
		var rcv, snd int
		rc.Control(func(fd uintptr) {
			rcv, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF)
			snd, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF)
		})
		c.Close()
		if buf > 0 && (rcv != 2*buf || snd != 2*buf) {
			t.Errorf("--socket-buffer %d: SO_RCVBUF %d, SO_SNDBUF %d, want %d", buf, rcv, snd, 2*buf)
		}
		if buf == 0 && rcv == 2*(96<<10) {
			t.Errorf("no --socket-buffer, yet SO_RCVBUF %d", rcv)
		}
	}
}
