// Package loop is pgmfa's network side: a gnet event loop that accepts
// clients, dials the database onto the same loop, drives each connection's
// login state machine (package proto/session), asks package mfa for the
// second factor, and hands every authenticated session off — to the
// kernel's sockmap (package bpf) when it can, to the bounded user-space
// relay (package loop/relay) when it cannot.
//
// No goroutine runs per connection: every callback for a session, on either
// of its two sockets, runs on the one event loop that owns the client
// socket, so a session's halves never race. Work that completes elsewhere
// (an out-of-band MFA approval, a timer) is brought back onto that loop with
// EventLoop.Execute.
package loop

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/panjf2000/gnet/v2"

	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/loop/relay"
	"github.com/pgmfa/pgmfa/loop/spare"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

// Splice modes.
const (
	SpliceAuto    = "auto"    // sockmap when the probe passes, else the relay
	SpliceSockmap = "sockmap" // sockmap or refuse to start
	SpliceOff     = "off"     // always the user-space relay
)

// Config is everything the loop needs. Zero values get the defaults noted.
type Config struct {
	// Listen addresses: "host:port" or a unix-socket path (a directory gets
	// the usual .s.PGSQL.<port> name).
	Listen []string
	// Upstream: "host:port" or a unix-socket path (or directory, with
	// port 5432 unless the path names the socket).
	Upstream string

	Loops int // event loops; 0 = one per CPU

	Auth                   session.Auth
	AllowCleartextPassword bool
	// Accounts and AccountMethod configure session.AuthAccounts.
	Accounts      session.Accounts
	AccountMethod string
	MaxMessageLen int
	// Spares is how many database connections are kept open ahead of the
	// logins that will use them (package loop/spare; 0: none), and
	// SpareMaxAge how long an unused one is kept (0: DefaultSpareMaxAge).
	// Not used with TLS towards the database.
	Spares      int
	SpareMaxAge time.Duration

	// The bounds of a login (zero: the defaults of package login).
	HandshakeTimeout time.Duration // whole login up to the MFA wait
	MFATimeout       time.Duration // out-of-band approval wait
	// StartupTimeout bounds the time from accept to the StartupMessage
	// (TLS handshake included): a connection that says nothing is closed
	// after it. Never longer than HandshakeTimeout.
	StartupTimeout time.Duration
	// MaxConns bounds the client connections at once, logins and sessions
	// alike; more are answered 53300 and closed. 0 = DefaultMaxConns, what
	// the open-file limit allows.
	MaxConns int

	// MFA policy.
	MFARequired bool
	MFAExempt   map[string]bool
	Guard       *mfa.Guard
	Approvals   *mfa.Approvals
	// Web is the approval page (--web; nil: none): see login.Gate.Web.
	Web login.Web

	Splice        string // auto | sockmap | off
	FlowThreshold int64  // sockmap: redirect queue per direction that starts flow control (0: bpf default; <0: off)
	MaxBacklog    int64  // sockmap: hard bound per direction, ends the session (0: bpf default)
	RelayBuffer   int    // relay: bytes per direction (0: 64 KiB)
	SocketBuf     int    // SO_SNDBUF/SO_RCVBUF for both sockets; 0 = kernel default
	// ReusePort sets SO_REUSEPORT on the TCP listeners: several processes
	// listen on one address and the kernel spreads connections over them.
	ReusePort bool

	// TLS (package tlsproxy): the client-facing certificate (nil: no TLS
	// for clients), the client policy, and TLS towards the database.
	TLSCerts    *tlsproxy.Certs
	TLSMode     session.TLSMode
	UpstreamTLS tlsproxy.UpstreamTLS

	Logger *slog.Logger
	Rand   io.Reader
	// Observer is told of every login and handed-off session, by both
	// drivers (the metrics); nil: none.
	Observer login.Observer
	// BeforeAccept runs once everything is bound and loaded and the event
	// loops run, before the first connection is accepted (pgmfa serve
	// drops its privileges there, so no client is ever served by a
	// privileged process). An error stops the server: Run returns it.
	BeforeAccept func() error
}

// Server is a running proxy.
type Server struct {
	gnet.BuiltinEventEngine

	cfg      Config
	log      *slog.Logger
	upAddr   net.Addr
	upName   string
	addrs    []string
	unixList []string

	splicer     *bpf.Splicer
	relay       *relay.Relay
	spares      *spare.Pool // nil: none
	gate        *login.Gate
	tls         *tlsproxy.Driver // nil without TLS
	upstreamTLS bool             // every connection goes to the TLS driver
	cancels     cancelMap
	sessions    sessionRegistry // live handed-off sessions (sessions.go)
	logins      sync.Map        // id → *conn: plaintext logins in flight (drain.go)
	draining    atomic.Bool

	// Takeover (takeover.go): the listeners received from the process
	// taken over (Run accepts on them), whether this process handed its
	// own to a successor (its unix-socket paths are then the successor's),
	// and the Splicers adopted from the process taken over.
	inherited       []net.Listener
	handedListeners atomic.Bool
	adoptMu         sync.Mutex
	adopted         []*bpf.Splicer
	// tkMu orders a takeover against Drain: a Drain asked while a
	// takeover runs (takingOver) waits for its outcome (drainAsked, -1:
	// none).
	tkMu       sync.Mutex
	takingOver bool
	drainAsked time.Duration

	eng       gnet.Engine
	acc       *acceptor
	idleSock  string // gnet's own, unreachable listener (see accept.go)
	booted    chan struct{}
	bootOnce  sync.Once
	bootErr   error
	nextID    atomic.Uint64
	conns     atomic.Int64
	stats     Stats
	stopped   atomic.Bool
	engineErr atomic.Value // string: the last error gnet logged
}

// Stats are counters for the admin API and tests.
type Stats struct {
	Accepted, Refused, LoginsOK, LoginsFailed atomic.Int64
	Spliced, Relayed, TLS, Active             atomic.Int64
	AcceptErrors                              atomic.Int64
}

// New validates the configuration and prepares the handoff paths. Run
// starts serving.
func New(cfg Config) (*Server, error) {
	if len(cfg.Listen) == 0 {
		return nil, errors.New("no --listen address")
	}
	if cfg.Upstream == "" {
		return nil, errors.New("no --upstream address")
	}
	t := login.Timeouts{Startup: cfg.StartupTimeout, Handshake: cfg.HandshakeTimeout, MFA: cfg.MFATimeout}.WithDefaults()
	cfg.StartupTimeout, cfg.HandshakeTimeout, cfg.MFATimeout = t.Startup, t.Handshake, t.MFA
	if cfg.MaxConns < 0 {
		return nil, errors.New("--max-conns must not be negative")
	}
	if cfg.Auth == "" {
		cfg.Auth = session.AuthPassthrough
	}
	if cfg.Auth == session.AuthAccounts && cfg.Accounts == nil {
		return nil, errors.New("--auth accounts needs the store's accounts")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.MFARequired && (cfg.Guard == nil || cfg.Approvals == nil) {
		return nil, errors.New("MFA is required but no MFA guard is configured")
	}
	if fit, limit := DefaultMaxConns(cfg.Loops); cfg.MaxConns == 0 {
		cfg.MaxConns = fit
	} else if cfg.MaxConns > fit {
		cfg.Logger.Warn("--max-conns is more than the open-file limit allows; past that, connections are refused with 53300 when descriptors run out",
			"max_conns", cfg.MaxConns, "fits", fit, "open_file_limit", limit)
	}
	s := &Server{cfg: cfg, log: cfg.Logger, booted: make(chan struct{}), gate: &login.Gate{
		Required: cfg.MFARequired, Exempt: cfg.MFAExempt, Guard: cfg.Guard, Approvals: cfg.Approvals, Web: cfg.Web, Logger: cfg.Logger,
	}}
	var err error
	if s.upAddr, s.upName, err = resolveUpstream(cfg.Upstream); err != nil {
		return nil, err
	}
	if s.addrs, s.unixList, err = listenAddrs(cfg.Listen); err != nil {
		return nil, err
	}
	if err := s.setUpTLS(); err != nil {
		return nil, err
	}
	if err := s.setUpHandoff(); err != nil {
		return nil, err
	}
	if !s.upstreamTLS {
		s.spares = spare.New(cfg.Spares, cmp.Or(cfg.SpareMaxAge, DefaultSpareMaxAge), s.dialUpstream, s.log)
	}
	return s, nil
}

// setUpHandoff loads the sockmap (per --splice) and starts the relay, which
// is always there: it is the fallback for any session the kernel refuses.
func (s *Server) setUpHandoff() error {
	switch s.cfg.Splice {
	case "", SpliceAuto, SpliceSockmap:
		// NewSplicer loads the program itself (once: a separate probe
		// would load it and parse the kernel's BTF twice).
		var err error
		s.splicer, err = bpf.NewSplicer(bpf.Options{FlowThreshold: s.cfg.FlowThreshold, MaxBacklog: s.cfg.MaxBacklog, Logger: s.log})
		if err != nil {
			if s.cfg.Splice == SpliceSockmap {
				return fmt.Errorf("--splice sockmap: %w", err)
			}
			s.log.Warn("kernel splicing unavailable; sessions use the user-space relay", "reason", err.Error())
		} else {
			s.log.Info("kernel splicing enabled (sockmap)")
			if err := s.splicer.UnixUpstreams(); err != nil && s.upAddr.Network() == "unix" {
				s.log.Warn("the database is on a unix socket, which this kernel cannot splice; sessions use the user-space relay", "reason", err.Error())
			}
			// Loading parses the kernel's BTF: megabytes of garbage the
			// runtime would otherwise keep mapped for a while. Hand it back
			// now, once, so the proxy's RSS reflects its sessions.
			debug.FreeOSMemory()
		}
	case SpliceOff:
		s.log.Info("kernel splicing off (--splice off); sessions use the user-space relay")
	default:
		return fmt.Errorf("--splice must be auto, sockmap or off, not %q", s.cfg.Splice)
	}
	r, err := relay.New(relay.Options{BufferSize: s.cfg.RelayBuffer, Logger: s.log})
	if err != nil {
		if s.splicer != nil {
			s.splicer.Close()
		}
		return err
	}
	s.relay = r
	return nil
}

// countLogin counts a login that got an audit line, for either driver.
func (s *Server) countLogin(ok bool) {
	if ok {
		s.stats.LoginsOK.Add(1)
	} else {
		s.stats.LoginsFailed.Add(1)
	}
}

// release gives a client connection's slot back (--max-conns), whichever
// path ended it: a login, a spliced or relayed session, or the TLS driver.
func (s *Server) release() {
	s.conns.Add(-1)
	s.stats.Active.Add(-1)
}

// Splicer is the kernel splicer sessions go to, nil when they go to the
// relay (its counters feed the metrics).
func (s *Server) Splicer() *bpf.Splicer { return s.splicer }

// Spares is the pool of spare database connections (nil: none).
func (s *Server) Spares() *spare.Pool { return s.spares }

// Splicing reports whether sessions go to the kernel.
func (s *Server) Splicing() bool { return s.splicer != nil }

// StatsSnapshot returns the counters as plain numbers.
func (s *Server) StatsSnapshot() map[string]int64 {
	m := map[string]int64{
		"accepted": s.stats.Accepted.Load(), "refused": s.stats.Refused.Load(),
		"logins_ok": s.stats.LoginsOK.Load(), "logins_failed": s.stats.LoginsFailed.Load(),
		"spliced": s.stats.Spliced.Load(), "relayed": s.stats.Relayed.Load(), "tls": s.stats.TLS.Load(),
		"active": s.stats.Active.Load(), "accept_errors": s.stats.AcceptErrors.Load(),
	}
	if s.splicer != nil {
		// Over ended spliced sessions: flow-control episodes, the bytes
		// they moved in user space, and sessions ended at the hard bound.
		ep, rel := s.splicer.FlowControl()
		m["flow_control_episodes"], m["flow_control_relayed_bytes"] = int64(ep), int64(rel)
		m["backlog_limit_ends"] = int64(s.splicer.BacklogLimitEnds())
	}
	if st := s.spares.Stats(); st != nil {
		m["spares_held"], m["spares_used"], m["spares_missed"] = int64(s.spares.Len()), st.Used.Load(), st.Missed.Load()
		m["spares_dead"], m["spares_expired"], m["spares_dial_errors"] = st.Dead.Load(), st.Expired.Load(), st.DialErrors.Load()
	}
	return m
}

// MaxConns is the connection limit in effect (--max-conns or its default).
func (s *Server) MaxConns() int { return s.cfg.MaxConns }

// Run serves until Stop. It returns once the engine has stopped: nil after
// Stop, an error when the proxy could not start or its event engine
// stopped by itself (a fatal error: the caller should exit non-zero).
func (s *Server) Run() error {
	lns := s.inherited
	if lns == nil {
		for _, p := range s.unixList {
			if err := removeStaleSocket(p); err != nil {
				s.failBoot(err)
				return err
			}
		}
		var err error
		if lns, err = s.listen(); err != nil {
			s.failBoot(err)
			return err
		}
	}
	s.acc = newAcceptor(s, lns)
	dir, err := os.MkdirTemp("", "pgmfa-engine-")
	if err != nil {
		s.acc.close()
		s.failBoot(err)
		return err
	}
	s.idleSock = filepath.Join(dir, "idle.sock")
	// TCP_NODELAY and --socket-buffer are set on our own listeners (Go
	// sets TCP_NODELAY on accepted and dialed sockets; see listen) and on
	// dialed database sockets (OnOpen), not through gnet's options, which
	// apply to gnet's listeners only.
	opts := []gnet.Option{
		gnet.WithMulticore(true),
		gnet.WithLogger(gnetLogger{s.log, &s.engineErr}),
		// The ticker's first tick comes once every event loop runs: the
		// accept loops start there (see OnTick).
		gnet.WithTicker(true),
	}
	if s.cfg.Loops > 0 {
		opts = append(opts, gnet.WithNumEventLoop(s.cfg.Loops))
	}
	err = gnet.Rotate(s, []string{"unix://" + s.idleSock}, opts...)
	if err == nil {
		select {
		case <-s.booted:
			err = s.bootErr // BeforeAccept refused (nil otherwise)
		default:
		}
	}
	s.acc.close()
	_ = os.RemoveAll(dir)
	if err == nil && !s.stopped.Load() {
		// gnet stops its engine on a fatal error and returns nil.
		msg, _ := s.engineErr.Load().(string)
		if msg == "" {
			msg = "no error was reported"
		}
		err = fmt.Errorf("the event engine stopped unexpectedly: %s", msg)
	}
	s.failBoot(err)
	s.shutdownHandoff()
	if !s.handedListeners.Load() {
		for _, p := range s.unixList {
			_ = os.Remove(p)
		}
	}
	return err
}

// failBoot closes Ready with err, unless it is closed already.
func (s *Server) failBoot(err error) {
	s.bootOnce.Do(func() {
		s.bootErr = err
		close(s.booted)
	})
}

// Ready is closed once the listeners accept connections (or Run failed:
// then Err says why).
func (s *Server) Ready() <-chan struct{} { return s.booted }

// Err is Run's start-up error, if any, once Ready is closed.
func (s *Server) Err() error { return s.bootErr }

// Stop closes the listeners and every connection, including spliced and
// relayed sessions.
func (s *Server) Stop(ctx context.Context) error {
	if !s.stopped.CompareAndSwap(false, true) {
		return nil
	}
	<-s.booted
	if s.bootErr != nil {
		return nil
	}
	s.acc.close()
	return s.eng.Stop(ctx)
}

func (s *Server) shutdownHandoff() {
	s.spares.Close()
	if s.tls != nil {
		s.tls.Close()
	}
	if s.splicer != nil {
		s.splicer.Close()
	}
	s.adoptMu.Lock()
	adopted := s.adopted
	s.adopted = nil
	s.adoptMu.Unlock()
	for _, sp := range adopted {
		sp.Close()
	}
	if s.relay != nil {
		s.relay.Close()
	}
}

// OnBoot records the engine for Stop and makes gnet's own listener
// unreachable (see accept.go).
func (s *Server) OnBoot(eng gnet.Engine) gnet.Action {
	s.eng = eng
	_ = os.Remove(s.idleSock)
	// Its directory too: pgmfa may switch to another user after start-up
	// (--user), which could then not open this 0700 directory of root's,
	// and gnet's RemoveAll of the socket at stop would fail.
	_ = os.Remove(filepath.Dir(s.idleSock))
	return gnet.None
}

// OnTick starts the accept loops at the first tick, which gnet's ticker
// sends once every event loop is registered and running (Engine.Register
// needs them).
func (s *Server) OnTick() (time.Duration, gnet.Action) {
	var action gnet.Action
	s.bootOnce.Do(func() {
		if f := s.cfg.BeforeAccept; f != nil {
			if err := f(); err != nil {
				s.bootErr = err
				close(s.booted)
				s.stopped.Store(true)
				action = gnet.Shutdown
				return
			}
		}
		s.acc.start()
		_, limit := DefaultMaxConns(s.cfg.Loops)
		s.log.Info("pgmfa listening", "listen", strings.Join(s.cfg.Listen, ","), "upstream", s.upName,
			"auth", string(s.cfg.Auth), "mfa_required", s.cfg.MFARequired, "splice", s.Splicing(),
			"max_conns", s.cfg.MaxConns, "open_file_limit", limit)
		close(s.booted)
	})
	return time.Hour, action
}

// resolveUpstream turns --upstream into a dialable address.
func resolveUpstream(a string) (net.Addr, string, error) {
	if strings.HasPrefix(a, "/") || strings.HasPrefix(a, "@") {
		p := a
		if st, err := os.Stat(a); err == nil && st.IsDir() {
			p = filepath.Join(a, ".s.PGSQL.5432")
		}
		return &net.UnixAddr{Name: p, Net: "unix"}, p, nil
	}
	ta, err := net.ResolveTCPAddr("tcp", a)
	if err != nil {
		return nil, "", fmt.Errorf("--upstream %q: %w", a, err)
	}
	return ta, ta.String(), nil
}

// listenAddrs turns --listen values into gnet addresses.
func listenAddrs(in []string) (addrs, unixPaths []string, err error) {
	port := 6432
	for _, a := range in {
		if _, p, err := net.SplitHostPort(a); err == nil && !strings.HasPrefix(a, "/") {
			if n, err := strconv.Atoi(p); err == nil {
				port = n
				break
			}
		}
	}
	for _, a := range in {
		switch {
		case strings.HasPrefix(a, "/"):
			p := a
			if st, err := os.Stat(a); err == nil && st.IsDir() {
				p = filepath.Join(a, fmt.Sprintf(".s.PGSQL.%d", port))
			}
			addrs = append(addrs, "unix://"+p)
			unixPaths = append(unixPaths, p)
		default:
			if _, _, err := net.SplitHostPort(a); err != nil {
				return nil, nil, fmt.Errorf("--listen %q: want host:port or a unix-socket path", a)
			}
			addrs = append(addrs, "tcp://"+a)
		}
	}
	return addrs, unixPaths, nil
}

// removeStaleSocket removes a unix socket left by a previous run, but never
// one that still accepts connections.
func removeStaleSocket(p string) error {
	st, err := os.Lstat(p)
	if err != nil {
		return nil
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("--listen %s exists and is not a socket", p)
	}
	if c, err := net.DialTimeout("unix", p, 200*time.Millisecond); err == nil {
		c.Close()
		return fmt.Errorf("--listen %s: another server is listening there", p)
	}
	return os.Remove(p)
}

// gnetLogger routes gnet's own logging into slog and keeps its last error
// (gnet logs why its engine stopped, and returns nil).
type gnetLogger struct {
	l    *slog.Logger
	last *atomic.Value
}

func (g gnetLogger) Debugf(f string, a ...any) { g.l.Debug("gnet: " + fmt.Sprintf(f, a...)) }
func (g gnetLogger) Infof(f string, a ...any)  { g.l.Debug("gnet: " + fmt.Sprintf(f, a...)) }
func (g gnetLogger) Warnf(f string, a ...any)  { g.l.Warn("gnet: " + fmt.Sprintf(f, a...)) }
func (g gnetLogger) Errorf(f string, a ...any) { g.error(fmt.Sprintf(f, a...)) }
func (g gnetLogger) Fatalf(f string, a ...any) { g.error(fmt.Sprintf(f, a...)) }

func (g gnetLogger) error(msg string) {
	g.last.Store(msg)
	g.l.Error("gnet: " + msg)
}
