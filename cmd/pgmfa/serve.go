package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/loop/admin"
	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/loop/metrics"
	"github.com/pgmfa/pgmfa/loop/relay"
	"github.com/pgmfa/pgmfa/loop/sysmon"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/mfa/pgstore"
	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

func init() {
	register("serve", "run the proxy (the default)", runServe)
}

// serveFlags are the flags of `pgmfa serve`.
type serveFlags struct {
	listen, upstream     string
	loops                int
	quietSysmon          bool
	auth                 string
	accountMethod        string
	allowCleartext       bool
	mfaMode, exempt      string
	remember, mfaTimeout time.Duration
	handshakeTimeout     time.Duration
	startupTimeout       time.Duration
	maxConns             int
	maxMessage           int
	spares               int
	spareMaxAge          time.Duration
	splice               string
	flowThreshold        int64
	maxBacklog           int64
	relayBuffer, sockBuf int
	store, adminAddr     string
	storeKeyFile         string
	reusePort            bool
	storeTimeout         time.Duration
	adminToken           string
	digits               int
	period               time.Duration
	skew                 int
	algorithm            string
	maxFailures          int
	failureWindow        time.Duration
	maxAddrFailures      int
	logLevel, logFormat  string
	metrics              string
	drainTimeout         time.Duration
	takeoverSocket       string
	takeover             string
	tls                  tlsFlags
	privs                privFlags
	web                  webFlags
}

func (f *serveFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.listen, "listen", "127.0.0.1:6432", "where clients connect: comma-separated host:port and/or unix-socket paths (a directory gets .s.PGSQL.<port>, so psql -h DIR works)")
	fs.StringVar(&f.upstream, "upstream", "127.0.0.1:5432", "the PostgreSQL server: host:port, or a unix-socket path (.../.s.PGSQL.5432, or its directory)")
	fs.IntVar(&f.loops, "loops", 0, "gnet event loops (0: one per CPU)")
	fs.BoolVar(&f.quietSysmon, "quiet-sysmon", true, "put the Go runtime's sysmon thread under SCHED_BATCH, so that its wake-ups (dozens per login while the event loops wait in epoll_wait) never preempt the database on a shared core, and, when started as root, raise its timer slack to 1 ms so that it wakes less; threads that inherit SCHED_BATCH are set back within a second, and those that inherit the slack before privileges are dropped are set back then (false: leave the scheduling alone; README, Performance)")
	fs.StringVar(&f.auth, "auth", "passthrough", "primary authentication: passthrough (the database checks the password; the proxy keeps none), password (the proxy asks for a cleartext password ending in the TOTP code and logs in upstream itself) or accounts (the proxy checks the client's own password against the accounts of \"pgmfa account add\" and logs in upstream as the account's role with a password only it holds)")
	fs.StringVar(&f.accountMethod, "account-method", proto.MethodSCRAM, "with --auth accounts, how clients prove their password: scram-sha-256; md5 (MD5 for accounts stored with --md5, SCRAM for the others); or password (cleartext, only over TLS unless --allow-cleartext-password; the code may end the password)")
	fs.BoolVar(&f.allowCleartext, "allow-cleartext-password", false, "with --auth password or --account-method password, allow the cleartext password over an unencrypted client connection (loopback-only setups)")
	fs.StringVar(&f.mfaMode, "mfa", "required", "required: every login needs a second factor; off: none (the proxy then only relays)")
	fs.StringVar(&f.exempt, "mfa-exempt", "", "comma-separated users that skip MFA (service accounts)")
	fs.DurationVar(&f.remember, "mfa-remember", 0, "after a successful MFA, further logins of the same user from the same client address pass without a code for this long (0: off); lets a connection pool open many connections with one code")
	fs.DurationVar(&f.mfaTimeout, "mfa-timeout", login.DefaultMFATimeout, "how long a login without a code waits for pgmfa approve")
	fs.DurationVar(&f.handshakeTimeout, "handshake-timeout", login.DefaultHandshakeTimeout, "the whole login up to the MFA decision (slow clients are closed after it)")
	fs.DurationVar(&f.startupTimeout, "startup-timeout", login.DefaultStartupTimeout, "from accept to the client's StartupMessage (TLS handshake included); a connection that says nothing is closed after it")
	fs.IntVar(&f.maxConns, "max-conns", 0, "most client connections at once, logins and sessions alike; more get SQLSTATE 53300 (0: what the open-file limit allows, about (limit - a reserve) / 3; logged at start)")
	fs.IntVar(&f.spares, "spare-conns", 1, "database connections kept open ahead of logins, so that a login does not wait for PostgreSQL to fork and start a backend (it forks one when it accepts a connection, and the backend then waits for the StartupMessage): opened after each successful login, closed unused after --spare-max-age, none held while no logins come (a client that cannot log in never makes pgmfa open one) (0: off; not used with an --upstream-sslmode other than disable)")
	fs.DurationVar(&f.spareMaxAge, "spare-max-age", loop.DefaultSpareMaxAge, "how long an unused spare connection is kept; keep it below the database's authentication_timeout (60s by default), after which PostgreSQL closes it (a closed spare is skipped, not used)")
	fs.IntVar(&f.maxMessage, "max-message-len", proto.DefaultMaxMessageLen, "largest protocol message accepted during login, bytes")
	fs.StringVar(&f.splice, "splice", "auto", "after login: auto (kernel sockmap when available, else the user-space relay), sockmap (or refuse to start), off (always the relay)")
	fs.Int64Var(&f.flowThreshold, "flow-threshold", 0, "sockmap flow control: bytes the kernel may queue between the two sockets of one direction of a session before that direction is moved through user space until its reader catches up (a slow reader, a bulk COPY FROM); the sender is slowed by TCP as on a direct connection, nothing is ended (0: the default, 4 MiB; -1: off, then --max-backlog ends such sessions)")
	fs.Int64Var(&f.maxBacklog, "max-backlog", 0, "sockmap hard bound: a session is ended (reason \"backlog limit\") when the kernel holds more than this many bytes of one direction outside both sockets' buffers; with flow control on only a peer that keeps sending while it reads nothing reaches it (0: the default, 64 MiB)")
	fs.IntVar(&f.relayBuffer, "relay-buffer", relay.DefaultBufferSize, "user-space relay: bytes buffered per direction of a session")
	fs.IntVar(&f.sockBuf, "socket-buffer", 0, "SO_SNDBUF/SO_RCVBUF for client and database sockets (0: kernel default, autotuned)")
	fs.StringVar(&f.store, "store", defaultStorePath(), "TOTP secret store written by pgmfa enroll: a JSON file, or a PostgreSQL connection string (postgres://USER@HOST/DB or \"host=… dbname=…\") shared by every pgmfa of a fleet, initialised with \"pgmfa store init\" (env PGMFA_STORE)")
	fs.StringVar(&f.storeKeyFile, "store-key-file", defaultKeyFile(), keyFileUsage)
	fs.DurationVar(&f.storeTimeout, "store-timeout", pgstore.DefaultTimeout, "with a PostgreSQL --store: the most one store call may take (connecting included) before the login that needs it is refused")
	fs.BoolVar(&f.reusePort, "reuse-port", false, "let several pgmfa processes listen on the same TCP --listen address (SO_REUSEPORT; the kernel spreads connections over them). Every process needs this flag, its own --admin, and the same PostgreSQL --store so MFA state is shared")
	fs.StringVar(&f.adminAddr, "admin", defaultAdminAddr(), "admin API for pgmfa approve: a unix-socket path (access: file permissions) or a loopback host:port (access: the --admin-token-file token); empty disables it (env PGMFA_ADMIN)")
	fs.StringVar(&f.adminToken, "admin-token-file", defaultTokenFile(), "with a TCP --admin: the file holding the token every admin request must carry; created (0600, random) when missing; must not be readable by group or others (env PGMFA_ADMIN_TOKEN_FILE)")
	fs.IntVar(&f.digits, "totp-digits", mfa.DefaultDigits, "TOTP code length for users enrolled without their own (6 or 8); with --auth password, also the length of the code split off the end of the password")
	fs.DurationVar(&f.period, "totp-period", mfa.DefaultPeriod, "TOTP time step")
	fs.IntVar(&f.skew, "totp-skew", mfa.DefaultSkew, "TOTP steps accepted either side of now (clock drift); 0 accepts the current step only")
	fs.StringVar(&f.algorithm, "totp-algorithm", mfa.DefaultAlgorithm, "TOTP HMAC: SHA1, SHA256 or SHA512")
	fs.IntVar(&f.maxFailures, "mfa-max-failures", mfa.DefaultMaxFailures, "failed MFA attempts per user within --mfa-failure-window before further attempts are refused unchecked")
	fs.DurationVar(&f.failureWindow, "mfa-failure-window", mfa.DefaultFailureWindow, "window for --mfa-max-failures and --mfa-max-addr-failures")
	fs.IntVar(&f.maxAddrFailures, "mfa-max-addr-failures", mfa.DefaultMaxAddrFailures, "failed MFA attempts per client address within the window")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&f.logFormat, "log-format", "text", "text or json")
	fs.StringVar(&f.metrics, "metrics", "", "serve Prometheus metrics at http://ADDR/metrics: a loopback host:port (127.0.0.1:9187) or a unix-socket path; any other address is refused (empty: off)")
	fs.DurationVar(&f.drainTimeout, "drain-timeout", defaultDrainTimeout, "on SIGTERM: stop accepting, let logins in flight finish and open sessions run for up to this long, then refuse the logins left (SQLSTATE 57P01) and cut the sessions left (0: SIGTERM stops at once, as SIGINT always does)")
	fs.StringVar(&f.takeoverSocket, "takeover-socket", "", "listen on this unix socket (mode 0600; peers of the same uid or root only) for a new pgmfa process that takes this one's place with --takeover: a restart or upgrade that drops no spliced session and refuses no login (empty: off)")
	fs.StringVar(&f.takeover, "takeover", "", "take over from the pgmfa whose --takeover-socket is this path: receive its listeners (--listen must be the same) and its spliced sessions; it finishes its logins in flight, drains its relayed and TLS sessions, and exits 0. Fails, leaving that process serving, when nothing or no pgmfa listens there")
	f.tls.register(fs)
	f.privs.register(fs)
	f.web.register(fs)
}

func runServe(args []string) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var f serveFlags
	f.register(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `usage: pgmfa [serve] [flags]

Runs the proxy. Clients connect to --listen and log in as they would to
PostgreSQL; the login completes only after a TOTP code is verified:
  PGOPTIONS='-c pgmfa.code=123456' psql -h 127.0.0.1 -p 6432 -U alice db
or, with --auth password, the code appended to the password, or out of band
with `+"`pgmfa approve USER CODE`"+`. SIGHUP reloads the secret store and
the TLS certificate. SIGTERM drains (see --drain-timeout); SIGINT stops at
once, closing every session.

flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "pgmfa serve: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	logger, err := newLogger(os.Stderr, f.logLevel, f.logFormat)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa:", err)
		return 2
	}
	if f.quietSysmon {
		if f.privs.guard = quietSysmon(logger); f.privs.guard != nil {
			defer f.privs.guard.Stop()
		}
	}
	if err := f.checkStartCaps(logger); err != nil {
		logger.Error("cannot start", "err", err)
		return 1
	}
	p, err := f.build(logger)
	if err != nil {
		logger.Error("cannot start", "err", err)
		return 1
	}
	switch {
	case f.takeover != "":
		// Before Run: the listeners are received, not bound.
		t, err := p.srv.TakeOver(f.takeover)
		if err != nil {
			p.shutdown()
			logger.Error("cannot start", "err", err)
			return 1
		}
		go p.takeOver(t, f.takeoverSocket)
	case f.takeoverSocket != "":
		ln, err := listenTakeover(f.takeoverSocket, false)
		if err != nil {
			p.shutdown()
			logger.Error("cannot start", "err", err)
			return 1
		}
		p.serveTakeovers(ln, f.takeoverSocket)
	}
	go f.afterStart(p, logger) // privs.go: least privilege once serving
	code := p.runUntilSignal()
	if code == 0 && p.failed.Load() {
		return 1
	}
	return code
}

// sysmonSlack is the timer slack given to the runtime's sysmon thread.
// 10 ms halved the proxy's context switches per login against 1 ms but
// more than doubled the wait for accept(2) (loop/sysmon has the
// measurements), so 1 ms.
const sysmonSlack = time.Millisecond

// quietSysmon puts the runtime's sysmon thread under SCHED_BATCH with a
// sysmonSlack timer slack (loop/sysmon) and returns the guard of the other
// threads; nil when that is not possible, which costs latency but nothing
// else. It runs before privileges are dropped: the slack needs
// CAP_SYS_NICE.
func quietSysmon(logger *slog.Logger) *sysmon.Guard {
	g, err := sysmon.Start(time.Second, sysmonSlack)
	switch {
	case errors.Is(err, sysmon.ErrNotNormal):
		logger.Info("sysmon thread left as it is: the process does not run under SCHED_OTHER")
		return nil
	case err != nil:
		logger.Warn("could not put the Go runtime's sysmon thread under SCHED_BATCH; logins may be slower on a busy host", "err", err.Error())
		return nil
	}
	if ok, err := g.SlackSet(); !ok {
		logger.Debug("Go runtime's sysmon thread put under SCHED_BATCH; its timer slack is left as it is", "tid", g.Thread(), "err", err.Error())
	} else {
		logger.Debug("Go runtime's sysmon thread put under SCHED_BATCH with a raised timer slack", "tid", g.Thread(), "slack", sysmonSlack)
	}
	return g
}

// proxy is a configured server with its store and admin listener.
type proxy struct {
	srv   *loop.Server
	store mfaStore
	certs *tlsproxy.Certs // nil without client TLS
	// webCerts is --web-cert (nil: none, or the page reuses certs).
	webCerts *tlsproxy.Certs
	admin    *http.Server
	stats    *http.Server // --metrics; nil when off
	log      *slog.Logger
	onStop   []func()

	drainTimeout time.Duration // SIGTERM drains for up to this long (0: stops at once)

	// Takeover (takeover.go): this process's takeover socket, and whether
	// its own takeover of another process failed (it exits non-zero).
	tkMu   sync.Mutex
	tkLn   *net.UnixListener
	failed atomic.Bool

	// reloadAccounts re-reads the accounts on SIGHUP (--auth accounts).
	reloadAccounts func()
}

// maxSpares bounds --spare-conns: each spare is a forked backend waiting
// in the database, and a few cover a burst (they are refilled as fast as
// the database forks).
const maxSpares = 64

func (f *serveFlags) build(logger *slog.Logger) (*proxy, error) {
	if f.drainTimeout < 0 {
		return nil, errors.New("--drain-timeout must not be negative")
	}
	if f.spares < 0 || f.spares > maxSpares {
		return nil, fmt.Errorf("--spare-conns must be 0 to %d, not %d", maxSpares, f.spares)
	}
	if f.spareMaxAge <= 0 || f.spareMaxAge > 10*time.Minute {
		return nil, fmt.Errorf("--spare-max-age must be more than 0 and at most 10m (PostgreSQL's largest authentication_timeout), not %s", f.spareMaxAge)
	}
	var required bool
	switch f.mfaMode {
	case "required":
		required = true
	case "off":
		logger.Warn("MFA is off (--mfa off): pgmfa only relays logins")
	default:
		return nil, fmt.Errorf("--mfa must be required or off, not %q", f.mfaMode)
	}
	var auth session.Auth
	switch f.auth {
	case "passthrough":
		auth = session.AuthPassthrough
	case "password":
		auth = session.AuthPassword
	case "accounts":
		auth = session.AuthAccounts
		switch f.accountMethod {
		case proto.MethodSCRAM, proto.MethodMD5, proto.MethodPassword:
		default:
			return nil, fmt.Errorf("--account-method must be scram-sha-256, md5 or password, not %q", f.accountMethod)
		}
	default:
		return nil, fmt.Errorf("--auth must be passthrough, password or accounts, not %q", f.auth)
	}
	if f.metrics != "" {
		if err := metrics.CheckAddr(f.metrics); err != nil {
			return nil, err
		}
	}
	certs, tlsMode, upTLS, err := f.tls.build()
	if err != nil {
		return nil, err
	}
	store, err := openStoreTimeout(f.store, f.storeKeyFile, f.storeTimeout)
	if err != nil {
		return nil, err
	}
	if ps, ok := store.(*pgStore); ok {
		// A store that is down at start is refused at once, with what to
		// do; one that goes down later only refuses logins until it is back.
		if err := ps.Check(); err != nil {
			store.Close()
			return nil, err
		}
	}
	if users, err := store.Users(); err == nil && required && len(users) == 0 {
		logger.Warn("the secret store has no enrolled users; logins will be refused until `pgmfa enroll USER`", "store", store.String())
	}
	if note := plaintextNote(store, f.storeKeyFile); note != "" {
		logger.Warn(note)
	}
	accounts, err := f.loadAccounts(auth, store, logger) // accountreg.go
	if err != nil {
		store.Close()
		return nil, err
	}
	skew, err := skewOption(f.skew)
	if err != nil {
		return nil, err
	}
	var met *metrics.Metrics
	var observer login.Observer
	var onStoreCall func(string, time.Duration, error)
	if f.metrics != "" {
		met = metrics.New(versionString())
		observer, onStoreCall = met, met.StoreCall
	}
	mopts := mfa.Options{
		Digits: f.digits, Period: f.period, Skew: skew, Algorithm: f.algorithm,
		MaxFailures: f.maxFailures, FailureWindow: f.failureWindow, MaxAddrFailures: f.maxAddrFailures,
		Remember: f.remember, OnStoreCall: onStoreCall,
		OnStoreError: func(user string, err error) {
			logger.Error("could not record an MFA code as used in the store; the login was refused", "user", user, "err", err)
		},
	}
	if err := mopts.Validate(); err != nil {
		return nil, err
	}
	guard := mfa.NewGuard(mopts, store)
	approvals := mfa.NewApprovals(guard)
	ps, fleet := store.(*pgStore)
	if fleet {
		// Waiting logins are the fleet's: an approval given to any
		// instance reaches the one holding the login by NOTIFY.
		approvals = mfa.NewFleetApprovals(guard, ps)
	}
	passkeys, _ := store.(mfa.PasskeyStore) // both stores keep passkeys
	page, err := f.web.build(guard, approvals, passkeys, certs, logger)
	if err != nil {
		return nil, err
	}
	var webGate login.Web // stays nil (not a nil *web.Server) without --web
	if page != nil {
		webGate = page.srv
	}

	srv, err := loop.New(loop.Config{
		Listen:                 splitList(f.listen),
		Upstream:               f.upstream,
		Loops:                  f.loops,
		Auth:                   auth,
		AllowCleartextPassword: f.allowCleartext,
		Accounts:               accounts,
		AccountMethod:          f.accountMethod,
		MaxMessageLen:          f.maxMessage,
		Spares:                 f.spares,
		SpareMaxAge:            f.spareMaxAge,
		HandshakeTimeout:       f.handshakeTimeout,
		StartupTimeout:         f.startupTimeout,
		MFATimeout:             f.mfaTimeout,
		MaxConns:               f.maxConns,
		MFARequired:            required,
		MFAExempt:              toSet(splitList(f.exempt)),
		Guard:                  guard,
		Approvals:              approvals,
		Web:                    webGate,
		Splice:                 f.splice,
		FlowThreshold:          f.flowThreshold,
		MaxBacklog:             f.maxBacklog,
		RelayBuffer:            f.relayBuffer,
		SocketBuf:              f.sockBuf,
		ReusePort:              f.reusePort,
		TLSCerts:               certs,
		TLSMode:                tlsMode,
		UpstreamTLS:            upTLS,
		Logger:                 logger,
		Observer:               observer,
		BeforeAccept:           func() error { return f.beforeAccept(logger) },
	})
	if err != nil {
		return nil, err
	}
	p := &proxy{srv: srv, store: store, certs: certs, log: logger, onStop: []func(){store.Close}, drainTimeout: f.drainTimeout}
	if accounts != nil {
		p.reloadAccounts = func() { reloadAccounts(accounts, store, logger) }
	}
	if fleet {
		ctx, stopListen := context.WithCancel(context.Background())
		p.onStop = []func(){stopListen, store.Close}
		go ps.Listen(ctx, approvals.Notify, func() {
			if err := approvals.Reconcile(); err != nil {
				logger.Error("could not check the store for approvals given while it was unreachable", "err", err)
			}
		}, func(err error) {
			logger.Error("lost the store's approval notifications; reconnecting", "err", err)
		})
		go func() {
			// Old failures, expired grants and abandoned waiting logins.
			t := time.NewTicker(10 * time.Minute)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case now := <-t.C:
					if err := ps.Prune(now); err != nil {
						logger.Warn("could not prune old rows of the store", "err", err)
					}
				}
			}
		}()
	}
	if page != nil {
		p.onStop = append(p.onStop, page.serve(logger))
		p.webCerts = page.certs
		logger.Info("approval page listening", "web", page.ln.Addr().String(), "mode", f.web.mode, "webhook", f.web.webhook != "", "passkeys", page.srv.PasskeysOn())
	}
	if met != nil {
		met.Splicer(srv.Splicer())
		met.Spares(srv.Spares())
		if page != nil && page.hook != nil {
			met.Webhook(page.hook.Sent, page.hook.Failed)
		}
		if page != nil {
			met.WebSignIns(page.srv.SignIns)
		}
		ln, err := metrics.Listen(f.metrics)
		if err != nil {
			return nil, err
		}
		p.stats = met.Server()
		go func() {
			if err := p.stats.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				logger.Error("metrics server stopped", "err", err)
			}
		}()
		logger.Info("metrics listening", "metrics", f.metrics, "path", metrics.Path)
	}
	if f.adminAddr != "" {
		var token string
		if !admin.IsUnix(f.adminAddr) {
			if token, err = admin.LoadOrCreateToken(f.adminToken); err != nil {
				return nil, fmt.Errorf("--admin %s: %w", f.adminAddr, err)
			}
		}
		ln, err := admin.Listen(f.adminAddr)
		if err != nil {
			return nil, fmt.Errorf("--admin %s: %w", f.adminAddr, err)
		}
		h := admin.NewServer(approvals, logger, token)
		h.SetStats(func() any { return srv.StatsSnapshot() })
		h.SetSessions(liveSessions{srv})
		p.admin = h.HTTPServer()
		go func() {
			if err := p.admin.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				logger.Error("admin API stopped", "err", err)
			}
		}()
		if token != "" {
			logger.Info("admin API listening", "admin", f.adminAddr, "token_file", f.adminToken)
		} else {
			logger.Info("admin API listening", "admin", f.adminAddr)
		}
	}
	return p, nil
}

// defaultDrainTimeout is --drain-timeout's default: time for a running
// query or COPY to end, and less than systemd's default stop timeout (90 s).
const defaultDrainTimeout = 30 * time.Second

// runUntilSignal serves until SIGINT/SIGTERM; SIGHUP reloads the store.
// SIGTERM drains (loop.Server.Drain; a second one changes nothing), SIGINT
// stops at once, during a drain too.
func (p *proxy) runUntilSignal() int {
	draining := false
	done := make(chan error, 1)
	go func() { done <- p.srv.Run() }()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	for {
		select {
		case err := <-done:
			p.shutdown()
			if err != nil {
				p.log.Error("proxy stopped", "err", err)
				return 1
			}
			return 0
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				if err := p.store.Reload(); err != nil {
					p.log.Error("reload of the secret store failed; keeping the old one", "err", err)
				} else {
					users, _ := p.store.Users()
					p.log.Info("secret store reloaded", "users", len(users))
					if p.reloadAccounts != nil {
						p.reloadAccounts()
					}
				}
				if p.certs != nil {
					if err := p.certs.Reload(); err != nil {
						p.log.Error("reload of the TLS certificate failed; keeping the old one", "err", err)
					} else {
						p.log.Info("TLS certificate reloaded")
					}
				}
				if p.webCerts != nil {
					if err := p.webCerts.Reload(); err != nil {
						p.log.Error("reload of the approval page's certificate failed; keeping the old one", "err", err)
					}
				}
				continue
			}
			if sig == syscall.SIGTERM && p.drainTimeout > 0 {
				if draining {
					p.log.Info("already draining; SIGINT stops at once", "signal", sig.String())
					continue
				}
				draining = true
				p.log.Info("shutting down gracefully", "signal", sig.String(), "drain_timeout", p.drainTimeout)
				go p.srv.Drain(p.drainTimeout)
				continue
			}
			p.log.Info("shutting down", "signal", sig.String())
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = p.srv.Stop(ctx)
			cancel()
		}
	}
}

func (p *proxy) shutdown() {
	p.closeTakeover()
	for _, s := range []*http.Server{p.admin, p.stats} {
		if s != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = s.Shutdown(ctx)
			cancel()
		}
	}
	for _, f := range p.onStop {
		f()
	}
}

func newLogger(w *os.File, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func toSet(xs []string) map[string]bool {
	m := make(map[string]bool, len(xs))
	for _, x := range xs {
		m[x] = true
	}
	return m
}

// skewOption turns --totp-skew into mfa.Options.Skew, where a zero stands
// for the default: the flag's 0 means what it says, the current step only.
func skewOption(steps int) (int, error) {
	switch {
	case steps < 0:
		return 0, fmt.Errorf("--totp-skew must be 0 (the current step only) or more, not %d", steps)
	case steps == 0:
		return mfa.NoSkew, nil
	}
	return steps, nil
}
