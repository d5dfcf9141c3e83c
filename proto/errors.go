package proto

import (
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgproto3"
)

// ProtocolError reports bytes from a client or server that break the wire
// protocol. Clients get it as SQLSTATE 08P01 (protocol_violation).
type ProtocolError struct {
	Msg string
}

// Error implements error.
func (e *ProtocolError) Error() string { return "protocol violation: " + e.Msg }

func protoErrorf(format string, args ...any) *ProtocolError {
	return &ProtocolError{Msg: fmt.Sprintf(format, args...)}
}

// AuthError is a login refused by one of the machines. Code is the SQLSTATE
// the client receives (28000, 28P01, 08P01, ...); Message and Hint are sent
// to the client as they are, so they must never carry secrets.
type AuthError struct {
	Code, Message, Hint string
}

// Error implements error: "SQLSTATE: message".
func (e *AuthError) Error() string { return e.Code + ": " + e.Message }

// Common SQLSTATEs of a failed login.
const (
	CodeInvalidAuthorization = "28000" // invalid_authorization_specification
	CodeInvalidPassword      = "28P01" // invalid_password
	CodeProtocolViolation    = "08P01" // protocol_violation
	CodeConnectionFailure    = "08006" // connection_failure
	CodeFeatureNotSupported  = "0A000" // feature_not_supported
	CodeTooManyConnections   = "53300" // too_many_connections
	CodeAdminShutdown        = "57P01" // admin_shutdown
)

// ServerError is an ErrorResponse the PostgreSQL server sent. It is kept
// intact so that the client can be shown the database's own words.
type ServerError struct {
	Resp *pgproto3.ErrorResponse
}

// Error implements error: "SQLSTATE: message", as the server said it.
func (e *ServerError) Error() string {
	if e.Resp == nil {
		return "server error"
	}
	return e.Resp.Code + ": " + e.Resp.Message
}

// ErrClientTerminated is returned when the client sent Terminate ('X')
// during login: an orderly end, not a failure.
var ErrClientTerminated = errors.New("client terminated the connection during login")

// Fatal builds a FATAL ErrorResponse.
func Fatal(code, message, hint string) *pgproto3.ErrorResponse {
	return &pgproto3.ErrorResponse{
		Severity:            "FATAL",
		SeverityUnlocalized: "FATAL",
		Code:                code,
		Message:             message,
		Hint:                hint,
	}
}

// ErrorFor maps err to the FATAL ErrorResponse a client should get. An
// AuthError keeps its code and hint, a ProtocolError becomes 08P01, a
// ServerError is the server's own response. Anything else gets a generic
// 08P01 text: internal error strings are not for clients.
func ErrorFor(err error) *pgproto3.ErrorResponse {
	var (
		ae *AuthError
		pe *ProtocolError
		se *ServerError
	)
	switch {
	case errors.As(err, &ae):
		code := ae.Code
		if code == "" {
			code = CodeInvalidAuthorization
		}
		return Fatal(code, ae.Message, ae.Hint)
	case errors.As(err, &pe):
		return Fatal(CodeProtocolViolation, pe.Msg, "")
	case errors.As(err, &se) && se.Resp != nil:
		return se.Resp
	default:
		return Fatal(CodeProtocolViolation, "pgmfa could not complete the login", "")
	}
}

// Append encodes msgs and appends them to dst. pgproto3 only fails to encode
// oversized or NUL-carrying fields, which the machines never build, so a
// failure is a programmer error and panics.
func Append(dst []byte, msgs ...pgproto3.Message) []byte {
	for _, m := range msgs {
		var err error
		dst, err = m.Encode(dst)
		if err != nil {
			panic(fmt.Sprintf("proto: encode %T: %v", m, err))
		}
	}
	return dst
}
