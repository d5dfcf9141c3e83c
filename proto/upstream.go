package proto

import (
	"fmt"
	"io"

	"github.com/jackc/pgx/v5/pgproto3"
)

// UpstreamConfig configures a login to the database as a client.
type UpstreamConfig struct {
	User, Database, Password string
	// Params are the other startup parameters (application_name, options,
	// ...), sent in this order after "user" and "database", which come from
	// the fields above (any "user" or "database" here is left out). Names
	// and values must not contain NUL (decoded startup packets never do).
	Params []StartupParam
	// ProtocolVersion is the version to ask for; 0 means 3.0.
	ProtocolVersion uint32
	// Rand is the source of the SCRAM client nonce (required for SCRAM).
	Rand io.Reader
	// MaxSCRAMIterations bounds the iteration count the server may ask for;
	// 0 means DefaultMaxSCRAMIterations.
	MaxSCRAMIterations int
}

type upState int

const (
	upStart    upState = iota // waiting for an authentication request
	upPassword                // cleartext or MD5 response sent
	upSASL                    // SASLInitialResponse sent, waiting for SASLContinue
	upSASLCont                // client-final sent, waiting for SASLFinal
	upSASLDone                // server signature verified, waiting for Ok
	upAuthed                  // AuthenticationOk received
	upReady                   // ReadyForQuery received
	upFailed
)

// UpstreamLogin logs in to the database as a client with the password the
// proxy holds: trust, cleartext, MD5 or SCRAM-SHA-256 (the server's
// signature is verified, so a server that does not know the password cannot
// complete the login). Not safe for concurrent use.
type UpstreamLogin struct {
	cfg    UpstreamConfig
	state  upState
	scram  *scramClient
	result LoginResult
	neg    negotiation
}

// NewUpstreamLogin returns a login ready to Start.
func NewUpstreamLogin(cfg UpstreamConfig) *UpstreamLogin {
	if cfg.ProtocolVersion == 0 {
		cfg.ProtocolVersion = pgproto3.ProtocolVersion30
	}
	if cfg.MaxSCRAMIterations <= 0 {
		cfg.MaxSCRAMIterations = DefaultMaxSCRAMIterations
	}
	return &UpstreamLogin{cfg: cfg, neg: newNegotiation(cfg.ProtocolVersion, cfg.Params)}
}

// Start returns the StartupMessage to send.
func (u *UpstreamLogin) Start() []byte {
	params := make([]StartupParam, 0, len(u.cfg.Params)+2)
	params = append(params, StartupParam{Name: "user", Value: u.cfg.User})
	if u.cfg.Database != "" {
		params = append(params, StartupParam{Name: "database", Value: u.cfg.Database})
	}
	for _, p := range u.cfg.Params {
		if p.Name != "user" && p.Name != "database" {
			params = append(params, p)
		}
	}
	return Append(nil, &StartupMessage{ProtocolVersion: u.cfg.ProtocolVersion, Params: params})
}

// Result is what the server sent from AuthenticationOk to ReadyForQuery.
func (u *UpstreamLogin) Result() *LoginResult {
	if u.result.Method == "" {
		u.result.Method = "trust"
	}
	return &u.result
}

// Handle consumes one server message. out is what to send to the server
// (nil: nothing); done is true once ReadyForQuery arrived. An ErrorResponse
// is returned as *ServerError with the server's SQLSTATE and message
// intact; a refusal by this machine (unsupported method, bad SCRAM server
// signature, ...) is an *AuthError; nonsense is a *ProtocolError. After an
// error the login is over.
func (u *UpstreamLogin) Handle(msg pgproto3.BackendMessage) (out []byte, done bool, err error) {
	if u.state == upFailed {
		return nil, false, protoErrorf("server message after the login failed")
	}
	out, err = u.handle(msg)
	if err != nil {
		u.state = upFailed
		u.cfg.Password = ""
		return nil, false, err
	}
	return out, u.state == upReady, nil
}

func (u *UpstreamLogin) handle(msg pgproto3.BackendMessage) ([]byte, error) {
	if e, ok := msg.(*pgproto3.ErrorResponse); ok {
		return nil, &ServerError{Resp: cloneError(e)}
	}
	switch u.state {
	case upAuthed:
		return nil, u.afterOk(msg)
	case upReady:
		return nil, protoErrorf("server sent %T after ReadyForQuery during login", msg)
	}
	switch msg := msg.(type) {
	case *pgproto3.NoticeResponse:
		return nil, nil // before AuthenticationOk: nothing to replay
	case *pgproto3.NegotiateProtocolVersion:
		if u.state != upStart {
			return nil, protoErrorf("NegotiateProtocolVersion during authentication")
		}
		if err := u.neg.negotiate(msg); err != nil {
			return nil, err
		}
		u.result.Negotiate = u.neg.npv
		return nil, nil
	}
	// An authentication request: the protocol is settled by now.
	if err := u.neg.settle(); err != nil {
		return nil, err
	}
	switch msg := msg.(type) {
	case *pgproto3.AuthenticationOk:
		switch u.state {
		case upStart, upPassword, upSASLDone:
		default:
			// Accepting Ok mid-SCRAM would let a server that does not know
			// the password skip proving it.
			return nil, &AuthError{Code: CodeInvalidAuthorization,
				Message: "the database ended SCRAM authentication without proving it knows the password"}
		}
		u.state = upAuthed
		u.cfg.Password = ""
		u.scram = nil
		return nil, nil
	case *pgproto3.AuthenticationCleartextPassword:
		if err := u.expectStart(); err != nil {
			return nil, err
		}
		u.state, u.result.Method = upPassword, "password"
		return Append(nil, &pgproto3.PasswordMessage{Password: u.cfg.Password}), nil
	case *pgproto3.AuthenticationMD5Password:
		if err := u.expectStart(); err != nil {
			return nil, err
		}
		u.state, u.result.Method = upPassword, "md5"
		inner := md5Hex([]byte(u.cfg.Password), []byte(u.cfg.User))
		return Append(nil, &pgproto3.PasswordMessage{Password: md5Response(inner, msg.Salt)}), nil
	case *pgproto3.AuthenticationSASL:
		if err := u.expectStart(); err != nil {
			return nil, err
		}
		return u.startSCRAM(msg.AuthMechanisms)
	case *pgproto3.AuthenticationSASLContinue:
		if u.state != upSASL {
			return nil, protoErrorf("unexpected SASLContinue")
		}
		final, err := u.scram.clientFinal(string(msg.Data))
		if err != nil {
			return nil, &AuthError{Code: CodeInvalidAuthorization, Message: "SCRAM authentication with the database failed: " + err.Error()}
		}
		u.state = upSASLCont
		return Append(nil, &pgproto3.SASLResponse{Data: []byte(final)}), nil
	case *pgproto3.AuthenticationSASLFinal:
		if u.state != upSASLCont {
			return nil, protoErrorf("unexpected SASLFinal")
		}
		if err := u.scram.verifyServerFinal(string(msg.Data)); err != nil {
			return nil, &AuthError{Code: CodeInvalidAuthorization, Message: "SCRAM authentication with the database failed: " + err.Error()}
		}
		u.state = upSASLDone
		return nil, nil
	case *pgproto3.AuthenticationGSS, *pgproto3.AuthenticationGSSContinue:
		return nil, unsupportedMethod("GSSAPI")
	case *AuthenticationUnsupported:
		return nil, unsupportedMethod(msg.Name())
	}
	return nil, protoErrorf("unexpected server message %T before AuthenticationOk", msg)
}

func (u *UpstreamLogin) expectStart() error {
	if u.state != upStart {
		return protoErrorf("server sent a second authentication request")
	}
	return nil
}

func (u *UpstreamLogin) startSCRAM(mechs []string) ([]byte, error) {
	has, plus := false, false
	for _, m := range mechs {
		has = has || m == mechSCRAM
		plus = plus || m == mechSCRAMPlus
	}
	if !has {
		if plus {
			return nil, &AuthError{Code: CodeInvalidAuthorization,
				Message: "the database only offers SCRAM-SHA-256-PLUS (channel binding), which pgmfa does not support upstream",
				Hint:    "allow scram-sha-256 without channel binding for connections from pgmfa"}
		}
		return nil, &AuthError{Code: CodeInvalidAuthorization,
			Message: fmt.Sprintf("the database offers no SASL mechanism pgmfa supports (offered: %q)", mechs)}
	}
	nonce, err := newNonce(u.cfg.Rand)
	if err != nil {
		return nil, &AuthError{Code: CodeInvalidAuthorization, Message: "SCRAM authentication with the database failed: " + err.Error()}
	}
	// The SCRAM user name is left empty like libpq does: PostgreSQL uses
	// the startup packet's user.
	u.scram = &scramClient{h: scramSHA256, password: u.cfg.Password, clientNonce: nonce, maxIterations: u.cfg.MaxSCRAMIterations}
	u.state, u.result.Method = upSASL, "scram-sha-256"
	return Append(nil, &pgproto3.SASLInitialResponse{AuthMechanism: mechSCRAM, Data: []byte(u.scram.clientFirst())}), nil
}

func (u *UpstreamLogin) afterOk(msg pgproto3.BackendMessage) error {
	switch msg := msg.(type) {
	case *pgproto3.ParameterStatus:
		u.result.Params = append(u.result.Params, pgproto3.ParameterStatus{Name: msg.Name, Value: msg.Value})
	case *pgproto3.BackendKeyData:
		k := *msg
		k.SecretKey = append([]byte(nil), msg.SecretKey...)
		u.result.Key = &k
	case *pgproto3.NoticeResponse:
		u.result.Notices = append(u.result.Notices, Append(nil, msg))
	case *pgproto3.ReadyForQuery:
		u.result.TxStatus = msg.TxStatus
		u.state = upReady
	default:
		return protoErrorf("unexpected server message %T after AuthenticationOk", msg)
	}
	return nil
}
