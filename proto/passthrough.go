package proto

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgproto3"
)

// expect is the authentication response the client owes the server.
type expect int

const (
	expectNone         expect = iota
	expectPassword            // PasswordMessage (cleartext or MD5)
	expectSASLInitial         // SASLInitialResponse
	expectSASLResponse        // SASLResponse
)

// Passthrough is the MFA gate for --auth passthrough: it relays a client's
// authentication exchange with the database, one message at a time, and
// holds everything from the database's AuthenticationOk on.
//
// The invariant it enforces: before AuthenticationOk, only authentication
// responses the server asked for travel from the client to the server, one
// per request; from AuthenticationOk on, nothing travels to the client at
// all. Releasing the session (LoginResult.AppendReady) is the caller's call,
// after MFA. Not safe for concurrent use.
type Passthrough struct {
	pending  expect
	inSASL   bool     // a SASL exchange was started
	offered  []string // SASL mechanisms forwarded to the client
	authed   bool
	ready    bool
	result   LoginResult
	finished bool // an error ended the login
	neg      negotiation
}

// NewPassthroughFor returns a relay waiting for the server's first message,
// for the StartupMessage the client sent (its protocol version and
// parameters; 0 and nil for 3.0 with no _pq_.* option), against which the
// server's NegotiateProtocolVersion is checked (see negotiate.go).
func NewPassthroughFor(version uint32, params []StartupParam) *Passthrough {
	return &Passthrough{neg: newNegotiation(version, params)}
}

// Authenticated reports whether the server's AuthenticationOk arrived (it
// is held, not forwarded).
func (p *Passthrough) Authenticated() bool { return p.authed }

// Ready reports whether the server's ReadyForQuery arrived (held).
func (p *Passthrough) Ready() bool { return p.ready }

// Result is what the server sent from AuthenticationOk on. Method is
// "trust" when the server asked for no password.
func (p *Passthrough) Result() *LoginResult {
	if p.result.Method == "" {
		p.result.Method = "trust"
	}
	return &p.result
}

// FromServer handles one server message during login and returns the bytes
// to forward to the client (nil: nothing).
//
// Before AuthenticationOk, authentication requests are forwarded, with
// SCRAM-SHA-256-PLUS removed from the SASL mechanisms (channel binding
// cannot survive a proxy that terminates transport); NegotiateProtocolVersion
// and NoticeResponse are forwarded; an ErrorResponse is forwarded and also
// returned as *ServerError. From AuthenticationOk on nothing is forwarded:
// ParameterStatus, BackendKeyData, NoticeResponse and ReadyForQuery are kept
// in the Result, and an ErrorResponse is returned as *ServerError only.
// Anything else is a *ProtocolError.
func (p *Passthrough) FromServer(m Message) (toClient []byte, err error) {
	if p.finished {
		return nil, protoErrorf("server message after the login ended")
	}
	if p.ready {
		p.finished = true
		return nil, protoErrorf("server sent %q after ReadyForQuery during login", m.Type)
	}
	msg, err := DecodeBackend(m)
	if err != nil {
		p.finished = true
		return nil, err
	}
	if e, ok := msg.(*pgproto3.ErrorResponse); ok {
		p.finished = true
		se := &ServerError{Resp: cloneError(e)}
		if p.authed {
			return nil, se
		}
		return m.Raw(), se
	}
	if p.authed {
		return nil, p.held(msg, m)
	}
	switch msg := msg.(type) {
	case *pgproto3.NoticeResponse:
		return m.Raw(), nil
	case *pgproto3.NegotiateProtocolVersion:
		if err := p.neg.negotiate(msg); err != nil {
			p.finished = true
			return nil, err
		}
		// Forwarded now, so the Result's copy is not replayed.
		p.result.Negotiate, p.result.NegotiateSent = p.neg.npv, true
		return m.Raw(), nil
	case *pgproto3.ParameterStatus, *pgproto3.BackendKeyData, *pgproto3.ReadyForQuery:
		p.finished = true
		return nil, protoErrorf("server sent %q before AuthenticationOk", m.Type)
	}
	// An authentication request. The protocol is settled by now.
	if err := p.neg.settle(); err != nil {
		p.finished = true
		return nil, err
	}
	// The server waits for the answer to the previous one before it sends
	// another; if it did not, something is off.
	if p.pending != expectNone {
		p.finished = true
		return nil, protoErrorf("server sent a new authentication request while awaiting the client's response")
	}
	switch msg := msg.(type) {
	case *pgproto3.AuthenticationOk:
		p.authed = true
		return nil, nil
	case *pgproto3.AuthenticationCleartextPassword:
		return p.request(m, expectPassword, "password")
	case *pgproto3.AuthenticationMD5Password:
		return p.request(m, expectPassword, "md5")
	case *pgproto3.AuthenticationSASL:
		if p.inSASL {
			p.finished = true
			return nil, protoErrorf("server restarted SASL authentication")
		}
		var kept []string
		for _, mech := range msg.AuthMechanisms {
			if mech != mechSCRAMPlus {
				kept = append(kept, mech)
			}
		}
		if len(kept) == 0 {
			p.finished = true
			return nil, &AuthError{Code: CodeInvalidAuthorization,
				Message: "the database only offers SCRAM-SHA-256-PLUS (channel binding), which cannot work through a proxy that terminates the connection",
				Hint:    "allow plain scram-sha-256 for this user in pg_hba.conf, or run pgmfa with --auth password"}
		}
		p.inSASL, p.offered = true, kept
		method := strings.ToLower(kept[0])
		for _, k := range kept {
			if k == mechSCRAM {
				method = "scram-sha-256"
			}
		}
		p.result.Method = method
		p.pending = expectSASLInitial
		return Append(nil, &pgproto3.AuthenticationSASL{AuthMechanisms: kept}), nil
	case *pgproto3.AuthenticationSASLContinue:
		if !p.inSASL {
			p.finished = true
			return nil, protoErrorf("SASLContinue outside a SASL exchange")
		}
		p.pending = expectSASLResponse
		return m.Raw(), nil
	case *pgproto3.AuthenticationSASLFinal:
		if !p.inSASL {
			p.finished = true
			return nil, protoErrorf("SASLFinal outside a SASL exchange")
		}
		return m.Raw(), nil
	case *pgproto3.AuthenticationGSS, *pgproto3.AuthenticationGSSContinue:
		p.finished = true
		return nil, unsupportedMethod("GSSAPI")
	case *AuthenticationUnsupported:
		p.finished = true
		return nil, unsupportedMethod(msg.Name())
	}
	p.finished = true
	return nil, protoErrorf("unexpected server message %T during login", msg)
}

func unsupportedMethod(name string) *AuthError {
	return &AuthError{Code: CodeInvalidAuthorization,
		Message: fmt.Sprintf("the database asks for %s authentication, which pgmfa does not support", name),
		Hint:    "use password, md5 or scram-sha-256 for connections from pgmfa in pg_hba.conf"}
}

func (p *Passthrough) request(m Message, e expect, method string) ([]byte, error) {
	if p.result.Method != "" && !p.inSASL {
		p.finished = true
		return nil, protoErrorf("server asked for a password twice")
	}
	if p.inSASL {
		p.finished = true
		return nil, protoErrorf("server switched method during SASL authentication")
	}
	p.result.Method = method
	p.pending = e
	return m.Raw(), nil
}

// held records a message that arrived after AuthenticationOk.
func (p *Passthrough) held(msg pgproto3.BackendMessage, m Message) error {
	switch msg := msg.(type) {
	case *pgproto3.ParameterStatus:
		p.result.Params = append(p.result.Params, pgproto3.ParameterStatus{Name: msg.Name, Value: msg.Value})
	case *pgproto3.BackendKeyData:
		k := *msg
		p.result.Key = &k
	case *pgproto3.NoticeResponse:
		p.result.Notices = append(p.result.Notices, m.Raw())
	case *pgproto3.ReadyForQuery:
		p.result.TxStatus = msg.TxStatus
		p.ready = true
	default:
		p.finished = true
		return protoErrorf("server sent %q after AuthenticationOk", m.Type)
	}
	return nil
}

// FromClient handles one client message during login and returns the bytes
// to forward to the server. Only an authentication response ('p') to an
// outstanding request is allowed, exactly one per request, and its body must
// match what was asked (PasswordMessage, SASLInitialResponse naming an
// offered mechanism, SASLResponse). Anything else is refused and must never
// be forwarded; Terminate returns ErrClientTerminated.
func (p *Passthrough) FromClient(m Message) (toServer []byte, err error) {
	if m.Type == 'X' {
		return nil, ErrClientTerminated
	}
	if m.Type != 'p' {
		return nil, protoErrorf("client sent message type %q before authentication completed", m.Type)
	}
	if p.finished || p.authed || p.pending == expectNone {
		return nil, protoErrorf("client sent an authentication response that was not asked for")
	}
	switch p.pending {
	case expectPassword:
		if err := checkPasswordBody(m.Body); err != nil {
			return nil, err
		}
	case expectSASLInitial:
		mech, _, err := decodeSASLInitial(m.Body)
		if err != nil {
			return nil, err
		}
		offered := false
		for _, o := range p.offered {
			offered = offered || o == mech
		}
		if !offered {
			if mech == mechSCRAMPlus {
				return nil, &AuthError{Code: CodeInvalidAuthorization,
					Message: "channel binding (SCRAM-SHA-256-PLUS) cannot work through pgmfa",
					Hint:    "connect with channel_binding=disable or prefer"}
			}
			return nil, protoErrorf("client selected SASL mechanism %q, which was not offered", clip(mech))
		}
	case expectSASLResponse:
		// SASLResponse is opaque bytes: nothing to check.
	}
	p.pending = expectNone
	return m.Raw(), nil
}

// checkPasswordBody validates a PasswordMessage body: one NUL-terminated
// string and nothing after it.
func checkPasswordBody(body []byte) error {
	if len(body) == 0 || body[len(body)-1] != 0 {
		return protoErrorf("malformed password message")
	}
	for _, b := range body[:len(body)-1] {
		if b == 0 {
			return protoErrorf("malformed password message")
		}
	}
	return nil
}

// decodeSASLInitial decodes a SASLInitialResponse strictly: pgproto3 skips
// the data length field, so the length is checked here against the bytes
// that follow it (-1 meaning no data).
func decodeSASLInitial(body []byte) (mech string, data []byte, err error) {
	var sir pgproto3.SASLInitialResponse
	if err := sir.Decode(body); err != nil {
		return "", nil, protoErrorf("malformed SASLInitialResponse")
	}
	i := len(sir.AuthMechanism) + 1
	n := int32(binary.BigEndian.Uint32(body[i:]))
	if !(n == -1 && len(sir.Data) == 0) && int(n) != len(sir.Data) {
		return "", nil, protoErrorf("malformed SASLInitialResponse: length mismatch")
	}
	return sir.AuthMechanism, sir.Data, nil
}

func cloneError(e *pgproto3.ErrorResponse) *pgproto3.ErrorResponse {
	c := *e
	if e.UnknownFields != nil {
		c.UnknownFields = make(map[byte]string, len(e.UnknownFields))
		for k, v := range e.UnknownFields {
			c.UnknownFields[k] = v
		}
	}
	return &c
}
