package tlsproxy

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

// Hooks are the proxy's shared services, provided by package loop. Every
// hook must be safe for concurrent use: sessions call them from their own
// goroutines.
type Hooks struct {
	// MFA decides an MFA request. decide is called exactly once, possibly
	// before MFA returns, possibly later from another goroutine (an
	// out-of-band approval; then waiting is true), unless cancel is called
	// first. id is the connection's (Handoff.ID).
	MFA func(req *session.MFARequest, id uint64, addr string, decide func(mfa.Path, mfa.Outcome)) (cancel func(), waiting bool)
	// RegisterCancel records the cancel key of a released session (the
	// database's own key, which the client received unchanged; id is the
	// Handoff's ID); remove is called at the end of the session.
	RegisterCancel func(key *pgproto3.BackendKeyData, id uint64) (remove func())
	// RouteCancel decides a CancelRequest received on a connection run here
	// from the client at addr: true means forward it to the database (the
	// driver does, over DialUpstream, so with TLS when the database side
	// uses TLS). Nil forwards every CancelRequest.
	RouteCancel func(req *pgproto3.CancelRequest, addr string) bool
	// LoginDone and SessionDone feed the proxy's counters; may be nil.
	// LoginDone is called once per login that got as far as a user name
	// (the logins that get an audit line).
	LoginDone   func(ok bool)
	SessionDone func()
	// Observer is every session's login.Observer (the metrics); may be nil.
	Observer login.Observer
	// Established is told of every released session: the connection's
	// ID, the login's user and database, the client's address, the
	// database's cancel key and the session's handle. The returned
	// function is called once when the session ends. May be nil.
	Established func(id uint64, user, database, addr string, key *pgproto3.BackendKeyData, h *Session) (remove func())
}

// Config is fixed for the life of a Driver.
type Config struct {
	// Certs is the client-facing certificate; nil means no client-facing
	// TLS (the driver then only serves sessions whose database side uses
	// TLS, and answers SSLRequest with 'N').
	Certs *Certs
	// Mode is the client-facing TLS policy (forced to TLSOff without Certs).
	Mode session.TLSMode
	// Session is the base configuration of the login machine; the driver
	// sets its TLS field from Mode.
	Session session.Config
	// DialUpstream opens a connection to the database (from Dialer, or a
	// plain dialer). It must give up when ctx ends.
	DialUpstream func(ctx context.Context) (net.Conn, error)
	// UpstreamName names the database in error messages.
	UpstreamName string
	// HandshakeTimeout bounds the whole login (TLS handshake included) up
	// to the MFA wait; MFATimeout bounds the wait for an out-of-band
	// approval. Zero: the defaults of package login, as package loop.
	HandshakeTimeout, MFATimeout time.Duration
	Logger                       *slog.Logger
	Hooks                        Hooks

	// StartupTimeout bounds the part of the login up to the StartupMessage
	// (TLS handshake included): a connection that says nothing is closed
	// after it. Zero: package login's default; never longer than
	// HandshakeTimeout.
	StartupTimeout time.Duration
}

// Handoff is one client connection given to the driver by the gnet loop.
type Handoff struct {
	// Conn is the client socket; the driver owns and closes it.
	Conn net.Conn
	// ReadAhead holds client bytes already read and not consumed by the
	// loop; they are replayed before anything is read from Conn (for a
	// direct TLS handshake, the start of the ClientHello).
	ReadAhead []byte
	// Reply is written to the client before anything else (the 'S' that
	// answers an SSLRequest); may be nil.
	Reply []byte
	// StartTLS: the TLS handshake starts right away (after Reply).
	StartTLS bool
	// Direct: a direct TLS handshake (sslnegotiation=direct); the client
	// must offer ALPN "postgresql" or the handshake is refused.
	Direct bool
	// ID and Addr identify the connection in the log (and Addr in MFA
	// throttling).
	ID   uint64
	Addr string
}

// Driver runs TLS connections, each on its own goroutines.
type Driver struct {
	cfg       Config
	log       *slog.Logger
	serverTLS *tls.Config // SSLRequest → 'S'
	directTLS *tls.Config // direct TLS: ALPN required

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	sessions map[*sess]struct{}
	closed   bool

	refuseState
}

// New returns a driver; it serves nothing until Serve.
func New(cfg Config) *Driver {
	t := login.Timeouts{Startup: cfg.StartupTimeout, Handshake: cfg.HandshakeTimeout, MFA: cfg.MFATimeout}.WithDefaults()
	cfg.StartupTimeout, cfg.HandshakeTimeout, cfg.MFATimeout = t.Startup, t.Handshake, t.MFA
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Certs == nil {
		cfg.Mode = session.TLSOff
	}
	cfg.Session.TLS = cfg.Mode
	d := &Driver{cfg: cfg, log: cfg.Logger, sessions: make(map[*sess]struct{})}
	d.refusing = make(chan struct{})
	d.ctx, d.cancel = context.WithCancel(context.Background())
	if cfg.Certs != nil {
		d.serverTLS = cfg.Certs.ServerConfig()
		d.directTLS = d.serverTLS.Clone()
		d.directTLS.GetConfigForClient = func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
			// Without ALPN a direct TLS client may not know it is talking
			// to PostgreSQL (ALPACA-style cross-protocol attacks); PostgreSQL
			// 17 refuses it too. (A client that offers other protocols but
			// not "postgresql" is refused by crypto/tls itself.)
			if !slices.Contains(hi.SupportedProtos, ALPN) {
				return nil, errNoALPN
			}
			return nil, nil
		}
	}
	return d
}

var errNoALPN = errors.New(`direct TLS connection without ALPN "postgresql"`)

// Serve runs the connection on its own goroutines and returns at once; done
// is called once, when the connection and its goroutines are finished.
//
// With StartTLS false the driver runs the connection from its first byte
// (the loop uses this when the database side needs TLS even for plaintext
// clients): the login machine itself answers an SSLRequest ('S' and the
// handshake, or 'N' without Certs) and recognises a direct TLS handshake.
func (d *Driver) Serve(h Handoff, done func()) {
	s := newSess(d, h, done)
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		_ = h.Conn.Close()
		if done != nil {
			done()
		}
		return
	}
	d.sessions[s] = struct{}{}
	d.wg.Add(1)
	d.mu.Unlock()
	s.spawn(s.login)
}

// Close ends every session (logins and relayed sessions alike, by closing
// their sockets) and waits until all their goroutines have returned.
// Connections served after Close are closed at once.
func (d *Driver) Close() {
	d.mu.Lock()
	d.closed = true
	all := make([]*sess, 0, len(d.sessions))
	for s := range d.sessions {
		all = append(all, s)
	}
	d.mu.Unlock()
	d.cancel()
	for _, s := range all {
		s.abort("proxy shutting down")
	}
	d.wg.Wait()
}

// Active reports the connections the driver is running.
func (d *Driver) Active() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.sessions)
}

func (d *Driver) forget(s *sess) {
	d.mu.Lock()
	delete(d.sessions, s)
	d.mu.Unlock()
	d.wg.Done()
}
