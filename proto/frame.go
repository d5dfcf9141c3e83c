package proto

import (
	"encoding/binary"
	"fmt"

	"github.com/jackc/pgx/v5/pgproto3"
)

// MaxStartupPacketLen is PostgreSQL's own limit for untyped startup-phase
// packets (MAX_STARTUP_PACKET_LENGTH).
const MaxStartupPacketLen = 10000

// DefaultMaxMessageLen bounds typed messages during login. Nothing a login
// legitimately sends comes close; the bound keeps a hostile peer from making
// the proxy buffer without limit.
const DefaultMaxMessageLen = 1 << 20

// Request codes of the untyped startup packets (in the version field).
const (
	cancelRequestCode = 80877102 // 1234.5678
	sslRequestCode    = 80877103 // 1234.5679
	gssEncRequestCode = 80877104 // 1234.5680
)

// Message is one typed message as it sits in a buffer: a tag byte, an int32
// length that counts itself, and the body.
type Message struct {
	Type byte   // e.g. 'p', 'R', 'E', 'Q'
	Body []byte // payload after the length; aliases the caller's buffer
}

// Raw returns the full wire form (tag + length + body) as a new slice.
func (m Message) Raw() []byte { return m.AppendRaw(make([]byte, 0, 5+len(m.Body))) }

// AppendRaw appends the wire form to dst.
func (m Message) AppendRaw(dst []byte) []byte {
	dst = append(dst, m.Type)
	dst = binary.BigEndian.AppendUint32(dst, uint32(4+len(m.Body)))
	return append(dst, m.Body...)
}

// NextStartup parses one untyped startup-phase packet at the start of buf.
//
// (nil, 0, nil) means the packet is incomplete: read more. On success msg is
// a *StartupMessage (protocol 3.0 or 3.2; parameters in the client's order),
// *pgproto3.SSLRequest,
// *pgproto3.GSSEncRequest or *pgproto3.CancelRequest and n is the packet
// length. The length is checked as soon as its four bytes are in, so a
// hostile claim is refused before anything proportional to it is buffered
// or allocated. Unknown codes, unsupported protocol versions (2.0, 3.1,
// 4.0, ...) and bad layouts are *ProtocolError.
func NextStartup(buf []byte) (msg pgproto3.FrontendMessage, n int, err error) {
	if len(buf) < 4 {
		return nil, 0, nil
	}
	length := binary.BigEndian.Uint32(buf)
	if length < 8 || length > MaxStartupPacketLen {
		return nil, 0, protoErrorf("invalid length of startup packet: %d", length)
	}
	if len(buf) < int(length) {
		return nil, 0, nil
	}
	n = int(length)
	body := buf[4:n]
	code := binary.BigEndian.Uint32(body)
	switch code {
	case sslRequestCode:
		if n != 8 {
			return nil, 0, protoErrorf("invalid length of SSLRequest: %d", n)
		}
		return &pgproto3.SSLRequest{}, n, nil
	case gssEncRequestCode:
		if n != 8 {
			return nil, 0, protoErrorf("invalid length of GSSENCRequest: %d", n)
		}
		return &pgproto3.GSSEncRequest{}, n, nil
	case cancelRequestCode:
		// 3.0 keys are 4 bytes, 3.2 keys up to 256 bytes.
		if n < 16 || n > 12+256 {
			return nil, 0, protoErrorf("invalid length of CancelRequest: %d", n)
		}
		var c pgproto3.CancelRequest
		if err := c.Decode(body); err != nil {
			return nil, 0, protoErrorf("malformed CancelRequest: %v", err)
		}
		return &c, n, nil
	case pgproto3.ProtocolVersion30, pgproto3.ProtocolVersion32:
		sm, err := decodeStartup(code, body)
		if err != nil {
			return nil, 0, err
		}
		return sm, n, nil
	default:
		return nil, 0, protoErrorf("unsupported frontend protocol %d.%d: pgmfa supports 3.0 and 3.2", code>>16, code&0xffff)
	}
}

// decodeStartup checks the layout the way PostgreSQL does (name/value pairs,
// then one terminating NUL as the very last byte). Repeated names are kept,
// in order, as PostgreSQL keeps them (see StartupMessage): the proxy reads
// "user" and "database" the way the database will (the last one), so the
// two never disagree on whose login it is.
func decodeStartup(version uint32, body []byte) (*StartupMessage, error) {
	var sm StartupMessage
	if err := sm.Decode(body); err != nil {
		return nil, protoErrorf("invalid startup packet layout: %v", err)
	}
	sm.ProtocolVersion = version
	return &sm, nil
}

func truncate(b []byte) string {
	if len(b) > 64 {
		b = b[:64]
	}
	return string(b)
}

// NextMessage parses one typed message at the start of buf, bounded by max
// (total length including the tag; max <= 0 means DefaultMaxMessageLen).
// (Message{}, 0, nil) means incomplete. A length below 4 or above the bound
// is a *ProtocolError, detected from the header alone.
func NextMessage(buf []byte, max int) (m Message, n int, err error) {
	if max <= 0 {
		max = DefaultMaxMessageLen
	}
	if len(buf) < 5 {
		return Message{}, 0, nil
	}
	length := binary.BigEndian.Uint32(buf[1:])
	if length < 4 {
		return Message{}, 0, protoErrorf("invalid message length %d for message type %q", length, buf[0])
	}
	if uint64(length)+1 > uint64(max) {
		return Message{}, 0, protoErrorf("message type %q of %d bytes exceeds the limit of %d bytes during login", buf[0], uint64(length)+1, max)
	}
	n = int(length) + 1
	if len(buf) < n {
		return Message{}, 0, nil
	}
	return Message{Type: buf[0], Body: buf[5:n:n]}, n, nil
}

// AuthenticationUnsupported is an authentication request pgproto3 has no
// type for and pgmfa cannot take part in (KerberosV5, SCM credentials,
// SSPI). DecodeBackend returns it so that the machines can refuse with a
// clear message instead of a decoding error.
type AuthenticationUnsupported struct {
	AuthType uint32
}

// Backend identifies this message as sendable by the PostgreSQL backend.
func (*AuthenticationUnsupported) Backend() {}

// AuthenticationResponse identifies this message as an authentication request.
func (*AuthenticationUnsupported) AuthenticationResponse() {}

// Decode decodes an 'R' body.
func (dst *AuthenticationUnsupported) Decode(src []byte) error {
	if len(src) < 4 {
		return fmt.Errorf("authentication message too short")
	}
	dst.AuthType = binary.BigEndian.Uint32(src)
	return nil
}

// Encode appends the message (type only, no payload) to dst.
func (src *AuthenticationUnsupported) Encode(dst []byte) ([]byte, error) {
	dst = append(dst, 'R', 0, 0, 0, 8)
	return binary.BigEndian.AppendUint32(dst, src.AuthType), nil
}

// Name is the method's name as PostgreSQL documents it.
func (src *AuthenticationUnsupported) Name() string {
	switch src.AuthType {
	case 2:
		return "KerberosV5"
	case 6:
		return "SCM credentials"
	case 9:
		return "SSPI"
	}
	return fmt.Sprintf("authentication type %d", src.AuthType)
}

// Authentication request codes ('R' messages).
const (
	authOk        = pgproto3.AuthTypeOk
	authCleartext = pgproto3.AuthTypeCleartextPassword
	authMD5       = pgproto3.AuthTypeMD5Password
	authGSS       = pgproto3.AuthTypeGSS
	authGSSCont   = pgproto3.AuthTypeGSSCont
	authSASL      = pgproto3.AuthTypeSASL
	authSASLCont  = pgproto3.AuthTypeSASLContinue
	authSASLFinal = pgproto3.AuthTypeSASLFinal
)

// DecodeBackend decodes a server message seen during login into its
// pgproto3 type: authentication requests ('R', all variants), ParameterStatus,
// BackendKeyData, ReadyForQuery, ErrorResponse, NoticeResponse and
// NegotiateProtocolVersion. The result may alias m.Body. Any other type, and
// any malformed body, is a *ProtocolError.
func DecodeBackend(m Message) (pgproto3.BackendMessage, error) {
	var msg pgproto3.BackendMessage
	switch m.Type {
	case 'R':
		if len(m.Body) < 4 {
			return nil, protoErrorf("authentication request too short")
		}
		switch t := binary.BigEndian.Uint32(m.Body); t {
		case authOk:
			msg = &pgproto3.AuthenticationOk{}
		case authCleartext:
			msg = &pgproto3.AuthenticationCleartextPassword{}
		case authMD5:
			msg = &pgproto3.AuthenticationMD5Password{}
		case authGSS:
			msg = &pgproto3.AuthenticationGSS{}
		case authGSSCont:
			msg = &pgproto3.AuthenticationGSSContinue{}
		case authSASL:
			msg = &pgproto3.AuthenticationSASL{}
		case authSASLCont:
			msg = &pgproto3.AuthenticationSASLContinue{}
		case authSASLFinal:
			msg = &pgproto3.AuthenticationSASLFinal{}
		case 2, 6, 9:
			msg = &AuthenticationUnsupported{}
		default:
			return nil, protoErrorf("unknown authentication request type %d", t)
		}
	case 'S':
		msg = &pgproto3.ParameterStatus{}
	case 'K':
		msg = &pgproto3.BackendKeyData{}
	case 'Z':
		msg = &pgproto3.ReadyForQuery{}
	case 'E':
		msg = &pgproto3.ErrorResponse{}
	case 'N':
		msg = &pgproto3.NoticeResponse{}
	case 'v':
		msg = &pgproto3.NegotiateProtocolVersion{}
	default:
		return nil, protoErrorf("unexpected server message type %q during login", m.Type)
	}
	if err := msg.Decode(m.Body); err != nil {
		return nil, protoErrorf("malformed server message %q: %v", m.Type, err)
	}
	if k, ok := msg.(*pgproto3.BackendKeyData); ok && len(k.SecretKey) > 256 {
		return nil, protoErrorf("BackendKeyData secret key of %d bytes exceeds 256", len(k.SecretKey))
	}
	return msg, nil
}
