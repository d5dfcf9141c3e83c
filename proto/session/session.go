// Package session is the login state machine of one proxied connection.
//
// It composes the building blocks of package proto (framing, the passthrough
// relay, the upstream login machine, MFA-code extraction) into the whole
// login of one client, from its first byte to the moment the session is
// handed off. It is a pure step function: the caller (package loop) feeds it
// client bytes, upstream bytes and events (upstream connected, MFA decided,
// timeout, a side closed) and performs the Output it gets back. It does no
// I/O, reads no clock and owns no goroutine, so every path through a login,
// including the hostile ones, is testable without sockets.
//
// The security invariant lives here: the client never receives
// AuthenticationOk, nor anything the database sent after its own
// AuthenticationOk, before the MFA decision is positive; and nothing the
// client sends other than authentication responses reaches the database
// before then. Client bytes that arrive while no authentication response is
// expected are left unparsed in the caller's buffer: they are forwarded after
// the release (pipelining) or dropped with the connection when MFA fails.
package session

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/proto"
)

// Auth selects how the primary (password) authentication is done.
type Auth string

const (
	// AuthPassthrough relays the client's authentication exchange with the
	// database message by message; the database decides. The default.
	AuthPassthrough Auth = "passthrough"
	// AuthPassword asks the client for a cleartext password, splits a TOTP
	// code off its end, and logs in upstream as a client with the rest.
	AuthPassword Auth = "password"
	// AuthAccounts authenticates the client against pgmfa's own accounts
	// (Config.Accounts: a verifier per account, checked by the proxy with
	// Config.AccountMethod), asks for MFA, and only then logs in upstream
	// as the account's database role with the credential pgmfa holds for
	// it. The client never learns the database password, and no database
	// connection is opened for a client that failed either factor.
	AuthAccounts Auth = "accounts"
)

// Accounts is what AuthAccounts needs of pgmfa's accounts: the verifiers,
// and the database login each account maps to. Implementations are safe
// for concurrent use and answer from memory (the machine does no I/O).
type Accounts interface {
	// Roles holds each account's verifier, by account name.
	Roles() *proto.Roles
	// Upstream is the database role and password pgmfa logs in with for
	// account (an empty password: the database asks for none).
	Upstream(account string) (role, password string, ok bool)
}

// Phase is where a login stands.
type Phase int

const (
	PhaseStartup  Phase = iota // waiting for SSLRequest/GSSENCRequest/CancelRequest/StartupMessage
	PhasePassword              // --auth password: waiting for the client's cleartext password
	PhaseDialing               // the caller is opening the upstream connection
	PhaseAuth                  // primary authentication in progress with the database
	PhaseMFA                   // primary authentication passed; waiting for MFA and/or ReadyForQuery
	PhaseReady                 // released to the client; the caller hands the session off
	PhaseClosed                // refused or finished; the caller flushes and closes both sides
)

var phaseNames = [...]string{"startup", "password", "dialing", "auth", "mfa", "ready", "closed"}

func (p Phase) String() string { return phaseNames[p] }

// Config is fixed for the life of the proxy.
type Config struct {
	Auth Auth
	// MaxMessageLen bounds each typed message during login (client and
	// upstream alike). Zero means proto.DefaultMaxMessageLen.
	MaxMessageLen int
	// MaxPipelined bounds the client bytes held, unparsed, while no
	// authentication response is expected (a client pipelining queries
	// behind its last auth message). Zero means 1 MiB.
	MaxPipelined int
	// MaxFromUpstream bounds the bytes the database may send during one
	// login, parsed or still unparsed in the caller's buffer: its
	// authentication requests, then the ParameterStatus, notices and
	// BackendKeyData held until the MFA decision, and anything it says
	// after ReadyForQuery. Far more than any real login; a database that
	// keeps talking while the login is held is cut off before it can make
	// the proxy buffer without bound. Zero means 4 MiB or two of the
	// largest messages (MaxMessageLen), whichever is more.
	MaxFromUpstream int64
	// CodeDigits is the length of a TOTP code split off a password in
	// AuthPassword mode. Zero means 6.
	CodeDigits int
	// AllowCleartext lets AuthPassword ask for a cleartext password over a
	// connection that is not encrypted (loopback-only setups).
	AllowCleartext bool
	// Rand makes the SCRAM nonces of AuthPassword logins. Nil means
	// crypto/rand.
	Rand io.Reader
	// MaxSCRAMIterations bounds the upstream's SCRAM iteration count in
	// AuthPassword mode (zero: proto's default).
	MaxSCRAMIterations int
	// TLS says how the client side treats encryption.
	TLS TLSMode
	// Accounts and AccountMethod configure AuthAccounts. AccountMethod is
	// proto.MethodSCRAM (the default), proto.MethodMD5 (MD5 for accounts
	// with an MD5 verifier, SCRAM for the others) or proto.MethodPassword
	// (cleartext, which AllowCleartext governs as for AuthPassword).
	Accounts      Accounts
	AccountMethod string
}

// TLSMode is the client-facing TLS policy.
type TLSMode int

const (
	// TLSOff answers SSLRequest with 'N'; a direct TLS handshake is refused.
	TLSOff TLSMode = iota
	// TLSAllow answers SSLRequest with 'S' (Output.StartTLS) and accepts a
	// direct TLS handshake; plaintext logins are still accepted.
	TLSAllow
	// TLSRequire is TLSAllow, and a plaintext StartupMessage is refused.
	TLSRequire
)

// MFASource says where the code under test came from.
type MFASource string

const (
	SourceNone     MFASource = ""         // no code: remembered, exempt or approval
	SourceStartup  MFASource = "code"     // pgmfa.code startup parameter or option
	SourcePassword MFASource = "password" // split off the password (AuthPassword)
)

// MFARequest asks the caller for an MFA decision. The caller answers with
// Machine.MFADecided, now or later (out-of-band approval).
type MFARequest struct {
	User   string
	Code   string // empty when the client sent none
	Source MFASource
	// Database and AppName (application_name) tell an approver which login
	// waits.
	Database, AppName string
}

// Decision is the caller's MFA verdict.
type Decision struct {
	OK bool
	// Code, Message and Hint make up the ErrorResponse when !OK. An empty
	// Code means 28000.
	Code, Message, Hint string
}

// Established describes a released session for the caller's handoff.
type Established struct {
	// Key is the database's own BackendKeyData, which the client received
	// unchanged (nil if the database sent none): the PID the client knows
	// is its backend's, and a CancelRequest carrying it is valid at the
	// database whichever proxy (or none) forwards it. The caller registers
	// it to route the client's cancels.
	Key    *pgproto3.BackendKeyData
	Result *proto.LoginResult
}

// Output is what one step asks the caller to do, in this order: write
// ToUpstream, write ToClient (or, when Established is set, pass ToClient to
// the handoff as the first bytes the client receives), dial, forward the
// cancel, ask for MFA, close.
type Output struct {
	ToClient   []byte
	ToUpstream []byte
	// Dial: open the upstream connection, then call UpstreamConnected.
	Dial bool
	// StartTLS: perform the TLS server handshake now, then call
	// SetEncrypted. For an SSLRequest, ToClient holds the 'S' to write
	// first; for a direct TLS handshake (PostgreSQL 17's
	// sslnegotiation=direct) nothing was consumed and the bytes in the
	// buffer are the ClientHello.
	StartTLS  bool
	DirectTLS bool
	// Cancel: the client sent a CancelRequest. The caller forwards it to
	// the database (the key is the database's own; see Established.Key) and
	// closes without answering, as PostgreSQL does.
	Cancel *pgproto3.CancelRequest
	// NeedMFA: ask for an MFA decision.
	NeedMFA *MFARequest
	// Established: the login is complete and released; hand the session off.
	Established *Established
	// Close: flush what is written and close both sides. Err says why (nil
	// for an orderly end such as a cancel request or a client Terminate).
	Close bool
	Err   error
}

// Machine is the login of one client connection. It is not safe for
// concurrent use; the caller drives it from the connection's event loop.
type Machine struct {
	cfg     Config
	phase   Phase
	reached Phase // the phase before PhaseClosed (Reached)

	// From the startup packet (MFA parameters stripped).
	startup *proto.StartupMessage
	user    string
	db      string
	code    string
	source  MFASource

	pt     *proto.Passthrough   // AuthPassthrough
	up     *proto.UpstreamLogin // AuthPassword; AuthAccounts once MFA passed
	srv    *proto.ServerLogin   // AuthAccounts: the client's own login
	dbSet  bool                 // the client named a database
	result *proto.LoginResult   // the upstream's login, once known

	// wantClient: the database has asked for an authentication response the
	// client has not sent yet. Only then are client bytes parsed.
	wantClient bool
	authedUp   bool // the upstream sent AuthenticationOk (held)
	readyUp    bool // the upstream sent ReadyForQuery (held)
	asked      bool // NeedMFA emitted
	decided    bool // positive MFA decision received
	heldErr    *proto.ServerError
	method     string
	encrypted  bool  // the client side is inside TLS
	upTaken    int64 // upstream bytes consumed (see Config.MaxFromUpstream)
	sslDone    bool  // an SSLRequest was answered
	gssDone    bool  // a GSSENCRequest was answered
}

// New returns a machine waiting for the client's first packet.
func New(cfg Config) *Machine {
	if cfg.Auth == "" {
		cfg.Auth = AuthPassthrough
	}
	if cfg.MaxMessageLen <= 0 {
		cfg.MaxMessageLen = proto.DefaultMaxMessageLen
	}
	if cfg.MaxPipelined <= 0 {
		cfg.MaxPipelined = 1 << 20
	}
	if cfg.MaxFromUpstream <= 0 {
		cfg.MaxFromUpstream = max(4<<20, 2*int64(cfg.MaxMessageLen))
	}
	if cfg.CodeDigits <= 0 {
		cfg.CodeDigits = 6
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	return &Machine{cfg: cfg}
}

// Phase reports where the login stands.
func (m *Machine) Phase() Phase { return m.phase }

// Reached is the phase the login had reached when it closed (Phase until
// then): the audit line of a refused login names it, which Phase, by then
// PhaseClosed, cannot.
func (m *Machine) Reached() Phase {
	if m.phase == PhaseClosed {
		return m.reached
	}
	return m.phase
}

// close moves the machine to PhaseClosed, remembering where it was.
func (m *Machine) close() {
	if m.phase != PhaseClosed {
		m.reached = m.phase
	}
	m.phase = PhaseClosed
}

// User, Database and Method describe the login for the audit log (empty
// until known). Method is the primary method the database asked for.
func (m *Machine) User() string     { return m.user }
func (m *Machine) Database() string { return m.db }
func (m *Machine) Method() string   { return m.method }

// NeedsClient reports whether the login still needs bytes from the client
// (a startup packet, a password, an answer to an authentication request).
// A client that half-closes while this is false can still be logged in.
func (m *Machine) NeedsClient() bool {
	switch m.phase {
	case PhaseStartup, PhasePassword:
		return true
	case PhaseDialing, PhaseAuth:
		// An authentication request is waiting for the client's answer.
		return m.wantClient
	}
	return false
}

// SetEncrypted records that the TLS handshake asked for by StartTLS
// completed; the startup phase goes on inside TLS.
func (m *Machine) SetEncrypted() { m.encrypted = true }

// Encrypted reports whether the client side is inside TLS.
func (m *Machine) Encrypted() bool { return m.encrypted }

// StartupMessage is the startup packet as forwarded upstream (MFA
// parameters removed, the rest in the client's order); nil before it
// arrived.
func (m *Machine) StartupMessage() *proto.StartupMessage { return m.startup }

// FromClient consumes at most one client packet from buf. It returns how many
// bytes it consumed (0: incomplete, or not expecting client bytes now; the
// caller keeps them) and what to do.
func (m *Machine) FromClient(buf []byte) (int, Output) {
	switch m.phase {
	case PhaseStartup:
		return m.startupPacket(buf)
	case PhasePassword:
		if m.srv != nil {
			return m.accountPacket(buf)
		}
		return m.passwordPacket(buf)
	case PhaseDialing, PhaseAuth, PhaseMFA:
		if !m.wantClient {
			// Hold, unparsed. A client that keeps sending while nothing is
			// asked of it is cut off before it can make us buffer without bound.
			if len(buf) > m.cfg.MaxPipelined {
				return 0, m.fail(&proto.ProtocolError{Msg: fmt.Sprintf(
					"client sent more than %d bytes before authentication completed", m.cfg.MaxPipelined)})
			}
			return 0, Output{}
		}
		msg, n, err := proto.NextMessage(buf, m.cfg.MaxMessageLen)
		if err != nil {
			return 0, m.fail(err)
		}
		if n == 0 {
			return 0, Output{}
		}
		toServer, err := m.pt.FromClient(msg)
		if errors.Is(err, proto.ErrClientTerminated) {
			return n, m.end(nil)
		}
		if err != nil {
			return n, m.fail(err)
		}
		m.wantClient = false
		return n, Output{ToUpstream: toServer}
	default:
		// Ready or closed: the caller owns the bytes now.
		return 0, Output{}
	}
}

// startupPacket handles the untyped packets of the startup phase.
func (m *Machine) startupPacket(buf []byte) (int, Output) {
	if len(buf) > 0 && buf[0] == 0x16 && !m.encrypted {
		// A TLS ClientHello as the very first byte: direct TLS.
		if m.cfg.TLS == TLSOff {
			return 0, m.end(errors.New("direct TLS handshake, but TLS is not configured"))
		}
		return 0, Output{StartTLS: true, DirectTLS: true}
	}
	msg, n, err := proto.NextStartup(buf)
	if err != nil {
		return 0, m.fail(err)
	}
	if n == 0 {
		return 0, Output{}
	}
	switch msg := msg.(type) {
	case *pgproto3.SSLRequest:
		if m.encrypted {
			return n, m.fail(&proto.ProtocolError{Msg: "SSLRequest inside an encrypted connection"})
		}
		if m.sslDone {
			return n, m.fail(repeatedRequest(sslRequestVersion))
		}
		m.sslDone = true
		if m.cfg.TLS == TLSOff {
			// No TLS here: 'N', and the client goes on in plaintext (or
			// gives up, per its sslmode).
			return n, Output{ToClient: []byte{'N'}}
		}
		if len(buf) > n {
			// Bytes sent after SSLRequest before the handshake would be
			// taken as if they had come over TLS (CVE-2021-23214): never
			// process them.
			return n, m.end(&proto.ProtocolError{Msg: "received unencrypted data after SSL request"})
		}
		return n, Output{ToClient: []byte{'S'}, StartTLS: true}
	case *pgproto3.GSSEncRequest:
		if m.gssDone || m.encrypted {
			return n, m.fail(repeatedRequest(gssEncRequestVersion))
		}
		m.gssDone = true
		// No GSS encryption: 'N'; the client may still ask for TLS.
		return n, Output{ToClient: []byte{'N'}}
	case *pgproto3.CancelRequest:
		m.close()
		c := *msg
		c.SecretKey = append([]byte(nil), msg.SecretKey...)
		return n, Output{Cancel: &c, Close: true}
	case *proto.StartupMessage:
		return n, m.startupMessage(msg)
	default:
		return 0, m.fail(&proto.ProtocolError{Msg: fmt.Sprintf("unexpected startup packet %T", msg)})
	}
}

// The "versions" of the negotiation requests, as PostgreSQL names them
// when it refuses one (1234.5679, 1234.5680).
const (
	sslRequestVersion    = 1234<<16 | 5679
	gssEncRequestVersion = 1234<<16 | 5680
)

// repeatedRequest refuses a second SSLRequest or GSSENCRequest (or a
// GSSENCRequest inside TLS) as PostgreSQL does: it answers one of each per
// connection and takes another as a startup packet of an unknown protocol
// version (0A000, checked against PostgreSQL 15). Answering every one would
// let a client that never reads pile answers up in the proxy.
func repeatedRequest(v uint32) error {
	return &proto.AuthError{Code: proto.CodeFeatureNotSupported,
		Message: fmt.Sprintf("unsupported frontend protocol %d.%d: server supports 3.0 to 3.2", v>>16, v&0xffff),
		Hint:    "a client sends at most one SSLRequest and one GSSENCRequest per connection"}
}

func (m *Machine) startupMessage(msg *proto.StartupMessage) Output {
	if m.cfg.TLS == TLSRequire && !m.encrypted {
		return m.fail(&proto.AuthError{Code: proto.CodeInvalidAuthorization,
			Message: "pgmfa requires an encrypted connection",
			Hint:    "connect with sslmode=require (or verify-full)"})
	}
	// Forwarded as the client sent them, pgmfa's own cut out. Of a repeated
	// "user" or "database" the last counts, as in PostgreSQL: the proxy
	// asks MFA for the user the database logs in.
	params, code, err := proto.StripMFA(msg.Params)
	if err != nil {
		return m.fail(err)
	}
	m.startup = &proto.StartupMessage{ProtocolVersion: msg.ProtocolVersion, Params: params}
	m.user, _ = m.startup.Get("user")
	if m.user == "" {
		return m.fail(&proto.AuthError{Code: proto.CodeInvalidAuthorization, Message: "no PostgreSQL user name specified in startup packet"})
	}
	m.db, _ = m.startup.Get("database")
	m.dbSet = m.db != ""
	if m.db == "" {
		m.db = m.user
	}
	if code != "" {
		m.code, m.source = code, SourceStartup
	}
	switch m.cfg.Auth {
	case AuthAccounts:
		return m.startAccount()
	case AuthPassword:
		if !m.cfg.AllowCleartext && !m.encrypted {
			return m.fail(&proto.AuthError{Code: proto.CodeInvalidAuthorization,
				Message: "pgmfa will not ask for a cleartext password over an unencrypted connection",
				Hint:    "connect with sslmode=require, or start pgmfa with --allow-cleartext-password on a loopback-only setup"})
		}
		m.phase = PhasePassword
		m.method = "password"
		return Output{ToClient: proto.Append(nil, &pgproto3.AuthenticationCleartextPassword{})}
	default:
		m.pt = proto.NewPassthroughFor(m.startup.ProtocolVersion, m.startup.Params)
		m.phase = PhaseDialing
		return Output{Dial: true}
	}
}

// passwordPacket reads the cleartext password in AuthPassword mode.
func (m *Machine) passwordPacket(buf []byte) (int, Output) {
	msg, n, err := proto.NextMessage(buf, m.cfg.MaxMessageLen)
	if err != nil {
		return 0, m.fail(err)
	}
	if n == 0 {
		return 0, Output{}
	}
	if msg.Type == 'X' {
		return n, m.end(nil)
	}
	if msg.Type != 'p' {
		return n, m.fail(&proto.ProtocolError{Msg: fmt.Sprintf("expected a password message, got message type %q", msg.Type)})
	}
	var pm pgproto3.PasswordMessage
	if err := pm.Decode(msg.Body); err != nil {
		return n, m.fail(&proto.ProtocolError{Msg: "malformed password message"})
	}
	password := pm.Password
	if m.code == "" {
		if pw, code, ok := SplitCode(pm.Password, m.cfg.CodeDigits); ok {
			password, m.code, m.source = pw, code, SourcePassword
		}
	}
	m.up = proto.NewUpstreamLogin(proto.UpstreamConfig{
		User:               m.user,
		Database:           m.db,
		Password:           password,
		Params:             m.startup.Params,
		ProtocolVersion:    m.startup.ProtocolVersion,
		Rand:               m.cfg.Rand,
		MaxSCRAMIterations: m.cfg.MaxSCRAMIterations,
	})
	m.phase = PhaseDialing
	return n, Output{Dial: true}
}

// SplitCode splits a TOTP code of the given number of digits off the end of
// a password ("secret123456" → "secret", "123456"). ok is false when the
// password is not longer than the code or does not end in enough digits.
func SplitCode(password string, digits int) (rest, code string, ok bool) {
	if len(password) <= digits {
		return password, "", false
	}
	tail := password[len(password)-digits:]
	for i := 0; i < len(tail); i++ {
		if tail[i] < '0' || tail[i] > '9' {
			return password, "", false
		}
	}
	return password[:len(password)-digits], tail, true
}

// UpstreamConnected is called once the upstream connection is open.
func (m *Machine) UpstreamConnected() Output {
	if m.phase != PhaseDialing {
		return Output{}
	}
	m.phase = PhaseAuth
	if m.up != nil {
		return Output{ToUpstream: m.up.Start()}
	}
	return Output{ToUpstream: proto.Append(nil, m.startup)}
}

// UpstreamFailed is called when the upstream could not be reached.
func (m *Machine) UpstreamFailed(addr string, err error) Output {
	if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
		// The proxy is out of descriptors, not the database out of reach:
		// the client should try again, as after "too many clients".
		return m.fail(&proto.AuthError{Code: proto.CodeTooManyConnections,
			Message: "pgmfa has no file descriptor left for the database connection",
			Hint:    "try again later; if this persists, raise pgmfa's open-file limit (LimitNOFILE) or lower --max-conns"})
	}
	return m.fail(&proto.AuthError{Code: proto.CodeConnectionFailure,
		Message: fmt.Sprintf("pgmfa could not connect to the database at %s: %v", addr, err),
		Hint:    "check that PostgreSQL is running and that pgmfa's --upstream points at it"})
}

// FromUpstream consumes at most one upstream message from buf.
func (m *Machine) FromUpstream(buf []byte) (int, Output) {
	if m.phase != PhaseAuth && m.phase != PhaseMFA {
		return 0, Output{}
	}
	if m.pt == nil && m.up == nil {
		// AuthAccounts waiting for MFA: no database connection yet, so
		// nothing from one.
		return 0, Output{}
	}
	if m.upTaken+int64(len(buf)) > m.cfg.MaxFromUpstream {
		return 0, m.upstreamOverLimit()
	}
	if m.readyUp {
		// The database says nothing after ReadyForQuery until asked; what
		// it does say is held in the buffer and forwarded after the release.
		return 0, Output{}
	}
	msg, n, err := proto.NextMessage(buf, m.cfg.MaxMessageLen)
	if err != nil {
		return 0, m.failUpstream(err)
	}
	if n == 0 {
		return 0, Output{}
	}
	m.upTaken += int64(n)
	if m.up != nil {
		return n, m.upstreamLogin(msg)
	}
	return n, m.passthrough(msg)
}

func (m *Machine) passthrough(msg proto.Message) Output {
	wasAuthed := m.pt.Authenticated()
	toClient, err := m.pt.FromServer(msg)
	if err != nil {
		var se *proto.ServerError
		if errors.As(err, &se) && wasAuthed {
			// After AuthenticationOk the client must not learn anything
			// from the database before MFA passed, not even an error.
			return m.holdError(se)
		}
		if errors.As(err, &se) {
			// Forwarded already, as the database's own words.
			m.close()
			return Output{ToClient: toClient, Close: true, Err: err}
		}
		return m.fail(err)
	}
	if msg.Type == 'R' && !wasAuthed {
		m.noteAuthRequest(msg)
	}
	out := Output{ToClient: toClient}
	if m.pt.Authenticated() && !wasAuthed {
		m.authedUp = true
		m.wantClient = false
		m.result = m.pt.Result()
		m.method = m.result.Method
		m.phase = PhaseMFA
		out.NeedMFA = m.mfaRequest()
	}
	if m.pt.Ready() {
		m.readyUp = true
		m.result = m.pt.Result()
		return m.maybeRelease(out)
	}
	return out
}

// noteAuthRequest records whether an authentication request forwarded to
// the client expects an answer. SASLFinal and Ok do not; everything the
// proxy forwards and the client must answer does.
func (m *Machine) noteAuthRequest(msg proto.Message) {
	if len(msg.Body) < 4 {
		return
	}
	switch binary.BigEndian.Uint32(msg.Body) {
	case pgproto3.AuthTypeCleartextPassword:
		m.wantClient, m.method = true, "password"
	case pgproto3.AuthTypeMD5Password:
		m.wantClient, m.method = true, "md5"
	case pgproto3.AuthTypeSASL:
		m.wantClient, m.method = true, "scram-sha-256"
	case pgproto3.AuthTypeSASLContinue:
		m.wantClient = true
	}
}

func (m *Machine) upstreamLogin(msg proto.Message) Output {
	bm, err := proto.DecodeBackend(msg)
	if err != nil {
		return m.failUpstream(err)
	}
	_, isOk := bm.(*pgproto3.AuthenticationOk)
	out, done, err := m.up.Handle(bm)
	if err != nil {
		var se *proto.ServerError
		if errors.As(err, &se) && m.authedUp {
			return m.holdError(se)
		}
		if errors.As(err, &se) && m.srv != nil {
			// AuthAccounts: the database refused pgmfa's own credential.
			// The client passed both factors, so it may know why, but in
			// pgmfa's words: the credential is not the client's.
			return m.fail(&proto.AuthError{Code: proto.CodeInvalidAuthorization,
				Message: fmt.Sprintf("pgmfa could not log in to the database for account %q: %s", m.user, se.Error()),
				Hint:    "check the account's database role and password (pgmfa account add --role, --db-password-file)"})
		}
		if errors.As(err, &se) {
			// The password was refused (or the like): the database's own
			// words are safe to pass on; the client sent that password.
			m.close()
			return Output{ToClient: proto.Append(nil, se.Resp), Close: true, Err: err}
		}
		return m.fail(err)
	}
	res := Output{ToUpstream: out}
	if isOk && !m.authedUp {
		m.authedUp = true
		m.phase = PhaseMFA
		if !m.asked { // AuthAccounts asked before dialing
			res.NeedMFA = m.mfaRequest()
		}
	}
	if done {
		m.readyUp = true
		m.result = m.up.Result()
		if m.srv == nil { // AuthAccounts reports the client's method
			m.method = m.result.Method
		}
		return m.maybeRelease(res)
	}
	return res
}

func (m *Machine) mfaRequest() *MFARequest {
	m.asked = true
	return &MFARequest{User: m.user, Code: m.code, Source: m.source,
		Database: m.db, AppName: m.appName()}
}

// holdError keeps an upstream error that arrived after its
// AuthenticationOk until the MFA decision; see MFADecided.
func (m *Machine) holdError(se *proto.ServerError) Output {
	m.heldErr = se
	m.readyUp = true // nothing more will come
	out := Output{}
	if !m.asked {
		out.NeedMFA = m.mfaRequest()
	}
	if m.decided {
		return m.maybeRelease(out)
	}
	return out
}

// MFADecided delivers the MFA verdict for the request emitted earlier.
func (m *Machine) MFADecided(d Decision) Output {
	if m.phase != PhaseMFA || m.decided {
		return Output{}
	}
	if !d.OK {
		code := d.Code
		if code == "" {
			code = proto.CodeInvalidAuthorization
		}
		return m.fail(&proto.AuthError{Code: code, Message: d.Message, Hint: d.Hint})
	}
	m.decided = true
	if m.srv != nil && m.up == nil {
		// AuthAccounts: both factors passed; now, and only now, the
		// database is dialed.
		return m.dialAccount()
	}
	return m.maybeRelease(Output{})
}

// maybeRelease releases the session once both the MFA decision and the
// database's ReadyForQuery are in.
func (m *Machine) maybeRelease(out Output) Output {
	if !m.decided || !m.readyUp {
		return out
	}
	if m.heldErr != nil {
		m.close()
		out.ToClient = append(out.ToClient, proto.Append(nil, m.heldErr.Resp)...)
		out.Close, out.Err = true, m.heldErr
		return out
	}
	// The database's own key, unchanged (protocol 3.0 and 3.2 lengths
	// alike): a client must see its real backend PID, which
	// pg_terminate_backend, NOTIFY and pg_stat_activity name.
	m.phase = PhaseReady
	out.ToClient = m.result.AppendReady(out.ToClient, m.result.Key)
	out.Established = &Established{Key: m.result.Key, Result: m.result}
	return out
}

// Timeout ends a login that took too long. mfaWait tells whether the
// deadline that expired was the wait for an out-of-band approval.
func (m *Machine) Timeout(mfaWait bool) Output {
	if m.phase == PhaseReady || m.phase == PhaseClosed {
		return Output{}
	}
	if mfaWait || (m.phase == PhaseMFA && m.asked && !m.decided) {
		return m.fail(&proto.AuthError{Code: proto.CodeInvalidAuthorization,
			Message: fmt.Sprintf("MFA for user %q was not completed in time", m.user),
			Hint: fmt.Sprintf("send a current code with the login: PGOPTIONS='-c pgmfa.code=NNNNNN', "+
				"or approve a waiting login with: pgmfa approve %s NNNNNN", m.user)})
	}
	return m.fail(&proto.AuthError{Code: proto.CodeProtocolViolation, Message: "login did not complete in time"})
}

// UpstreamClosed is called when the database side closed before the
// session was handed off.
func (m *Machine) UpstreamClosed(err error) Output {
	if m.phase == PhaseReady || m.phase == PhaseClosed || (m.pt == nil && m.up == nil) {
		// Over, or (AuthAccounts before its dial) no database side yet.
		return Output{}
	}
	if m.heldErr != nil {
		// The database refused the session after its AuthenticationOk and
		// hung up, as it does. The refusal is held until the MFA decision
		// (see holdError); the hang-up changes nothing.
		return Output{}
	}
	msg := "the database closed the connection during login"
	if err != nil {
		msg += ": " + strings.TrimPrefix(err.Error(), "read: ")
	}
	return m.fail(&proto.AuthError{Code: proto.CodeConnectionFailure, Message: msg})
}

// ErrUpstreamOverLimit is the Err of a login ended because the database
// sent more than Config.MaxFromUpstream.
var ErrUpstreamOverLimit = errors.New("the database sent more than pgmfa holds for one login")

// upstreamOverLimit ends a login whose database sent more than
// MaxFromUpstream. While a refusal of the database is held until the MFA
// decision (see holdError), the client may not learn anything yet, not
// even this: the connection is closed without words.
func (m *Machine) upstreamOverLimit() Output {
	if m.heldErr != nil {
		return m.end(ErrUpstreamOverLimit)
	}
	return m.fail(&proto.AuthError{Code: proto.CodeConnectionFailure, Message: ErrUpstreamOverLimit.Error()})
}

// ClientClosed is called when the client went away before the handoff.
func (m *Machine) ClientClosed() Output {
	if m.phase == PhaseReady || m.phase == PhaseClosed {
		return Output{}
	}
	return m.end(errors.New("client closed the connection during login"))
}

// fail refuses the login: an ErrorResponse to the client, Terminate to the
// database if it is connected, close.
func (m *Machine) fail(err error) Output {
	m.close()
	return Output{
		ToClient:   proto.Append(nil, proto.ErrorFor(err)),
		ToUpstream: m.terminate(),
		Close:      true,
		Err:        err,
	}
}

// failUpstream handles garbage from the database: the client gets a generic
// error, not the bytes.
func (m *Machine) failUpstream(err error) Output {
	return m.fail(&proto.AuthError{Code: proto.CodeProtocolViolation, Message: "pgmfa received an invalid message from the database: " + err.Error()})
}

// end closes without an error to the client.
func (m *Machine) end(err error) Output {
	m.close()
	return Output{ToUpstream: m.terminate(), Close: true, Err: err}
}

func (m *Machine) terminate() []byte {
	if m.pt == nil && m.up == nil {
		return nil
	}
	return proto.Append(nil, &pgproto3.Terminate{})
}

// appName is the client's application_name (the last one sent, as
// PostgreSQL takes it), for the listing of waiting logins.
func (m *Machine) appName() string {
	v, _ := m.startup.Get("application_name")
	return v
}
