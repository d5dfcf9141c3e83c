package main

import (
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"

	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/loop/web"
	"github.com/pgmfa/pgmfa/mfa"
)

// webFlags are serve's approval-page flags (loop/web).
type webFlags struct {
	addr, url, cert, key, mode string
	insecureLoopback           bool
	webhook                    string
}

func (f *webFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.addr, "web", "", "serve the approval page on this host:port over HTTPS (empty: off); a login without a code then gets a one-time link (see --web-mode)")
	fs.StringVar(&f.url, "web-url", "", "the approval page's address as users reach it, used in links and as the passkeys' origin: passkeys need a domain name here, not an IP address (default: https://ADDR of --web; required when --web has no specific host)")
	fs.StringVar(&f.cert, "web-cert", "", "PEM certificate of the approval page (default: --tls-cert); reloaded on SIGHUP")
	fs.StringVar(&f.key, "web-key", "", "PEM private key of --web-cert")
	fs.BoolVar(&f.insecureLoopback, "web-insecure-loopback", false, "serve the approval page over plaintext HTTP; only on a loopback --web address (tests, development)")
	fs.StringVar(&f.mode, "web-mode", web.ModeRefer, "with --web, a login without a code is: refer (refused at once with 28000 and a HINT carrying a one-time link; approving admits the retry from the same IP for 2m) or wait (it waits as without --web; the link goes to --mfa-webhook)")
	fs.StringVar(&f.webhook, "mfa-webhook", "", "with --web: POST a JSON event (user, client address, database, approval link, expiry) to this http(s) URL whenever a login gets a link; retried with backoff, never blocking logins")
}

// webPage is a started approval page.
type webPage struct {
	srv   *web.Server
	http  *http.Server
	ln    net.Listener
	hook  *web.Webhook
	certs *tlsproxy.Certs // --web-cert; nil when it reuses --tls-cert or is plaintext
}

// serve serves the page until shutdown; stop is for the proxy's onStop.
func (p *webPage) serve(logger *slog.Logger) (stop func()) {
	go func() {
		if err := p.http.Serve(p.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("approval page stopped", "err", err)
		}
	}()
	return func() {
		p.http.Close()
		if p.hook != nil {
			p.hook.Close()
		}
	}
}

// build checks the flags and opens the page's listener (nil: --web off).
func (f *webFlags) build(guard *mfa.Guard, approvals *mfa.Approvals, passkeys mfa.PasskeyStore, clientCerts *tlsproxy.Certs, logger *slog.Logger) (*webPage, error) {
	if f.addr == "" {
		if f.webhook != "" || f.cert != "" || f.url != "" || f.insecureLoopback {
			return nil, errors.New("--web-url, --web-cert, --web-insecure-loopback and --mfa-webhook need --web")
		}
		return nil, nil
	}
	if (f.cert == "") != (f.key == "") {
		return nil, errors.New("--web-cert and --web-key go together")
	}
	if f.url == "" {
		// A link to 0.0.0.0 reaches nobody: say where users find the page.
		if host, _, err := net.SplitHostPort(f.addr); err == nil {
			if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
				return nil, fmt.Errorf("--web %s listens on every address: give --web-url, the page's address as users reach it", f.addr)
			}
		}
	}
	p := &webPage{}
	var getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	switch {
	case f.insecureLoopback:
	case f.cert != "":
		var err error
		if p.certs, err = tlsproxy.LoadCerts(f.cert, f.key); err != nil {
			return nil, fmt.Errorf("--web-cert: %w", err)
		}
		getCert = certFunc(p.certs)
	case clientCerts != nil:
		getCert = certFunc(clientCerts)
	}
	if f.webhook != "" {
		u, err := url.Parse(f.webhook)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return nil, fmt.Errorf("--mfa-webhook must be an http(s):// URL, not %q", f.webhook)
		}
		if u.Scheme == "http" {
			if ip := net.ParseIP(u.Hostname()); u.Hostname() != "localhost" && (ip == nil || !ip.IsLoopback()) {
				logger.Warn("--mfa-webhook is plaintext HTTP off loopback: its events carry approval links", "host", u.Host)
			}
		}
	}
	ln, err := web.Listen(f.addr, getCert, f.insecureLoopback)
	if err != nil {
		return nil, err
	}
	base := f.url
	if base == "" {
		scheme := "https://"
		if f.insecureLoopback {
			scheme = "http://"
		}
		base = scheme + ln.Addr().String()
	}
	if f.webhook != "" {
		p.hook = web.NewWebhook(f.webhook, logger)
	}
	cfg := web.Config{Guard: guard, Approvals: approvals, URL: base, Mode: f.mode, Secure: !f.insecureLoopback, Webhook: p.hook, Logger: logger, Passkeys: passkeys}
	if p.srv, err = web.New(cfg); err != nil {
		ln.Close()
		if p.hook != nil {
			p.hook.Close()
		}
		return nil, err
	}
	p.ln, p.http = ln, p.srv.HTTPServer()
	return p, nil
}

func certFunc(c *tlsproxy.Certs) func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.Current(), nil }
}
