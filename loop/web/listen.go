package web

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"
)

// Listen opens the page's listener: TLS with getCert, or — only with
// insecureLoopback and only on a loopback address — plaintext, for tests
// and development. The page signs people in with codes and hands out
// approvals: it is never plaintext on a network.
func Listen(addr string, getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error), insecureLoopback bool) (net.Listener, error) {
	if getCert == nil && !insecureLoopback {
		return nil, errors.New("--web needs a certificate: --web-cert/--web-key or --tls-cert/--tls-key (plaintext only on loopback with --web-insecure-loopback)")
	}
	if getCert != nil && insecureLoopback {
		return nil, errors.New("--web-insecure-loopback and a certificate exclude each other")
	}
	if insecureLoopback {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("--web %s: %w", addr, err)
		}
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return nil, fmt.Errorf("--web %s: --web-insecure-loopback serves plaintext on a loopback address only", addr)
		}
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--web %s: %w", addr, err)
	}
	if insecureLoopback {
		if tcp, ok := ln.Addr().(*net.TCPAddr); !ok || !tcp.IP.IsLoopback() {
			ln.Close()
			return nil, fmt.Errorf("--web %s resolved to %s, which is not loopback", addr, ln.Addr())
		}
		return ln, nil
	}
	return tls.NewListener(ln, &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: getCert, NextProtos: []string{"http/1.1"}}), nil
}

// HTTPServer wraps the page's handler with timeouts that bound slow clients.
func (s *Server) HTTPServer() *http.Server {
	return &http.Server{
		Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 60 * time.Second, MaxHeaderBytes: 16 << 10,
	}
}
