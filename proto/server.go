package proto

import (
	"errors"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Methods of the client-facing login (ServerConfig.Method).
const (
	MethodTrust    = "trust"
	MethodPassword = "password"
	MethodMD5      = "md5"
	MethodSCRAM    = "scram-sha-256"
)

// CheckServerMethod reports whether m is a method ServerLogin implements;
// use it to validate configuration up front.
func CheckServerMethod(m string) error {
	switch m {
	case MethodTrust, MethodPassword, MethodMD5, MethodSCRAM:
		return nil
	}
	return fmt.Errorf("unsupported authentication method %q (want trust, password, md5 or scram-sha-256)", m)
}

// ServerConfig configures a client-facing login.
type ServerConfig struct {
	// Method is "trust", "password" (cleartext, checked against the
	// verifier), "md5" or "scram-sha-256".
	Method string
	Roles  *Roles
	User   string // from the startup packet
	// Rand supplies the SCRAM server nonce, the MD5 salt and the key behind
	// dummy salts for unknown users.
	Rand io.Reader
}

type srvState int

const (
	srvInit srvState = iota
	srvPassword
	srvMD5
	srvSASLInitial
	srvSASLFinal
	srvDone
	srvFailed
)

// ServerLogin authenticates a client against the stored verifiers, acting
// as the server. It never sends AuthenticationOk: that is the caller's, once
// MFA passed. Unknown users go through the same exchange, with the same
// work, against a dummy verifier and fail with the same message as a wrong
// password, so that user names cannot be probed. Not safe for concurrent
// use.
type ServerLogin struct {
	cfg      ServerConfig
	state    srvState
	verifier *Verifier // nil: unknown user (dummy exchange, always fails)
	salt     [4]byte
	scram    *scramServer
}

// NewServerLogin returns a login ready to Start. The verifier is looked up
// now: a later change to Roles affects later logins only.
func NewServerLogin(cfg ServerConfig) *ServerLogin {
	s := &ServerLogin{cfg: cfg}
	s.verifier, _ = cfg.Roles.Lookup(cfg.User)
	return s
}

// Start returns the first authentication request to send, or done for
// trust. With an unknown Method (or, for md5, a Rand that fails) it returns
// nothing and not done, and Handle fails: check the configuration with
// CheckServerMethod and close the connection when Start returns neither.
func (s *ServerLogin) Start() (toClient []byte, done bool) {
	if s.state != srvInit {
		return nil, s.state == srvDone
	}
	switch s.cfg.Method {
	case MethodTrust:
		s.state = srvDone
		return nil, true
	case MethodPassword:
		s.state = srvPassword
		return Append(nil, &pgproto3.AuthenticationCleartextPassword{}), false
	case MethodMD5:
		if s.verifier != nil && !s.verifier.IsSCRAM() {
			if err := s.read(s.salt[:]); err != nil {
				s.state = srvFailed
				return nil, false
			}
			s.state = srvMD5
			return Append(nil, &pgproto3.AuthenticationMD5Password{Salt: s.salt}), false
		}
		// A SCRAM verifier cannot answer an MD5 challenge; PostgreSQL then
		// uses SCRAM, and so do we (unknown users too, as with
		// PostgreSQL's default password_encryption).
		fallthrough
	case MethodSCRAM:
		s.state = srvSASLInitial
		return Append(nil, &pgproto3.AuthenticationSASL{AuthMechanisms: []string{mechSCRAM}}), false
	}
	s.state = srvFailed
	return nil, false
}

func (s *ServerLogin) read(b []byte) error {
	if s.cfg.Rand == nil {
		return errors.New("no randomness source configured")
	}
	_, err := io.ReadFull(s.cfg.Rand, b)
	return err
}

// Done reports whether the client authenticated.
func (s *ServerLogin) Done() bool { return s.state == srvDone }

// Handle consumes one client message. toClient is the next request (or the
// SASLFinal); done means the client proved its password. Errors are
// *AuthError (28P01 for a wrong password or unknown user, 28000 or 08P01
// for a refused or malformed exchange), or ErrClientTerminated.
func (s *ServerLogin) Handle(m Message) (toClient []byte, done bool, err error) {
	if m.Type == 'X' {
		s.state = srvFailed
		return nil, false, ErrClientTerminated
	}
	toClient, err = s.handle(m)
	if err != nil {
		s.state = srvFailed
		return nil, false, err
	}
	return toClient, s.state == srvDone, nil
}

func (s *ServerLogin) failed() error {
	return &AuthError{Code: CodeInvalidPassword,
		Message: fmt.Sprintf("password authentication failed for user %q", s.cfg.User)}
}

func (s *ServerLogin) handle(m Message) ([]byte, error) {
	switch s.state {
	case srvFailed:
		if s.cfg.Method != "" && CheckServerMethod(s.cfg.Method) != nil {
			return nil, &AuthError{Code: CodeInvalidAuthorization, Message: "pgmfa is misconfigured: " + CheckServerMethod(s.cfg.Method).Error()}
		}
		return nil, &AuthError{Code: CodeInvalidAuthorization, Message: "authentication already failed"}
	case srvInit, srvDone:
		return nil, protoErrorf("client sent message type %q when no authentication response was expected", m.Type)
	}
	if m.Type != 'p' {
		return nil, &AuthError{Code: CodeProtocolViolation,
			Message: fmt.Sprintf("expected an authentication response, got message type %q", m.Type)}
	}
	switch s.state {
	case srvPassword, srvMD5:
		if err := checkPasswordBody(m.Body); err != nil {
			return nil, &AuthError{Code: CodeProtocolViolation, Message: "malformed password message"}
		}
		pw := string(m.Body[:len(m.Body)-1])
		if pw == "" {
			return nil, &AuthError{Code: CodeInvalidPassword, Message: "empty password returned by client"}
		}
		var ok bool
		if s.state == srvPassword {
			ok = s.checkCleartext(pw)
		} else {
			ok = s.verifier.checkMD5(pw, s.salt) // srvMD5 implies a known MD5 verifier
		}
		if !ok {
			return nil, s.failed()
		}
		s.state = srvDone
		return nil, nil
	case srvSASLInitial:
		mech, data, err := decodeSASLInitial(m.Body)
		if err != nil {
			return nil, &AuthError{Code: CodeProtocolViolation, Message: "malformed SASLInitialResponse"}
		}
		switch mech {
		case mechSCRAM:
		case mechSCRAMPlus:
			// A mechanism we did not offer, which PostgreSQL refuses as
			// a protocol violation too (as it does -PLUS on a plaintext
			// connection, where it offers none).
			return nil, &AuthError{Code: CodeProtocolViolation,
				Message: "client selected an invalid SASL authentication mechanism \"" + mechSCRAMPlus + "\": channel binding is not offered by pgmfa",
				Hint:    "connect with channel_binding=disable or prefer"}
		default:
			return nil, &AuthError{Code: CodeProtocolViolation,
				Message: fmt.Sprintf("client selected an invalid SASL authentication mechanism %q", clip(mech))}
		}
		if err := s.newSCRAM(); err != nil {
			return nil, err
		}
		first, err := s.scram.serverFirstMsg(string(data))
		if err != nil {
			return nil, scramAuthError(err)
		}
		s.state = srvSASLFinal
		return Append(nil, &pgproto3.AuthenticationSASLContinue{Data: []byte(first)}), nil
	case srvSASLFinal:
		final, ok, err := s.scram.serverFinalMsg(string(m.Body))
		if err != nil {
			return nil, scramAuthError(err)
		}
		if !ok || s.verifier == nil || !s.verifier.IsSCRAM() {
			return nil, s.failed()
		}
		s.state = srvDone
		return Append(nil, &pgproto3.AuthenticationSASLFinal{Data: []byte(final)}), nil
	}
	return nil, protoErrorf("unexpected state")
}

func scramAuthError(err error) error {
	var f *scramFailure
	if errors.As(err, &f) {
		return &AuthError{Code: f.code, Message: f.msg}
	}
	return &AuthError{Code: CodeProtocolViolation, Message: err.Error()}
}

// newSCRAM prepares the server side of SCRAM: the user's verifier, or a
// dummy with a stable per-user salt when the user is unknown or has no
// SCRAM verifier (the exchange then runs to the end and fails).
func (s *ServerLogin) newSCRAM() error {
	nonce := make([]byte, scramNonceLen)
	if err := s.read(nonce); err != nil {
		return &AuthError{Code: CodeInvalidAuthorization, Message: "pgmfa could not generate a SCRAM nonce"}
	}
	sc := &scramServer{h: scramSHA256, nonce: b64(nonce)}
	if v := s.verifier; v != nil && v.IsSCRAM() {
		sc.salt, sc.iter, sc.keys = v.salt, v.iter, v.keys
	} else {
		sc.salt, sc.iter = s.mockSalt(), s.cfg.Roles.mockIterations()
		dummy := make([]byte, scramSHA256.size)
		sc.keys = scramKeys{stored: dummy, server: dummy}
	}
	s.scram = sc
	return nil
}

func (s *ServerLogin) mockSalt() []byte {
	if s.cfg.Roles != nil {
		return s.cfg.Roles.mockSalt(s.cfg.User, s.cfg.Rand)
	}
	salt := make([]byte, 16)
	s.read(salt)
	return salt
}

// checkCleartext checks a cleartext password, doing comparable work for
// unknown users.
func (s *ServerLogin) checkCleartext(pw string) bool {
	if s.verifier == nil {
		scramSHA256.saltedPassword(pw, s.mockSalt(), s.cfg.Roles.mockIterations())
		return false
	}
	return s.verifier.checkCleartext(s.cfg.User, pw)
}
