package proto

import (
	"strings"

	"github.com/jackc/pgx/v5/pgproto3"
)

// What pgmfa speaks (README, "Protocol versions"):
//
//   - Protocol 3.0 and 3.2, as the client asks. pgmfa offers nothing of its
//     own: the StartupMessage goes to the database with the client's version
//     and every parameter but pgmfa's, so the database answers the version
//     and the _pq_.* options exactly as it would answer the client, and its
//     NegotiateProtocolVersion is relayed. 3.2 changes only the length of
//     the cancel key (BackendKeyData up to 256 secret bytes, CancelRequest
//     to match), which pgmfa carries at any length; after the login the
//     session is spliced byte for byte, so nothing 3.2 adds later is parsed.
//   - A database that accepts a _pq_.* option would change the protocol in a
//     way pgmfa cannot know (PostgreSQL 13-18 accept none). pgmfa never
//     lets a session start on a feature it cannot carry: an option the
//     client sent that the database does not list as unsupported ends the
//     login (ProtocolError) before the client sees any authentication
//     request.
//   - A NegotiateProtocolVersion is checked the way libpq 18 checks it
//     (pqGetNegotiateProtocolVersion3): a version between 3.0 and the one
//     asked for, never 3.1, only _pq_.* options and only ones the client
//     sent, and some change; it must be the database's first message and
//     come at most once. Anything else is a ProtocolError that ends the
//     connection.

// negotiation follows the protocol negotiation of one login: what the
// client asked for and what the database answered.
type negotiation struct {
	version uint32   // asked for (3.0 when zero)
	options []string // _pq_.* parameters sent, in order
	npv     *pgproto3.NegotiateProtocolVersion
	settled bool // the database sent something after (or instead of) it
}

func newNegotiation(version uint32, params []StartupParam) negotiation {
	if version == 0 {
		version = pgproto3.ProtocolVersion30
	}
	n := negotiation{version: version}
	for _, p := range params {
		if strings.HasPrefix(p.Name, "_pq_.") {
			n.options = append(n.options, p.Name)
		}
	}
	return n
}

// negotiate takes the database's NegotiateProtocolVersion.
func (n *negotiation) negotiate(m *pgproto3.NegotiateProtocolVersion) error {
	if n.settled || n.npv != nil {
		return protoErrorf("NegotiateProtocolVersion after the database's first message")
	}
	if err := CheckNegotiate(m, n.version, n.options); err != nil {
		return err
	}
	c := *m
	c.UnrecognizedOptions = append([]string(nil), m.UnrecognizedOptions...)
	n.npv = &c
	return nil
}

// settle is called on the database's first other message: by then every
// _pq_.* option the client sent must have been refused.
func (n *negotiation) settle() error {
	if n.settled {
		return nil
	}
	n.settled = true
	for _, o := range n.options {
		if n.npv == nil || !contains(n.npv.UnrecognizedOptions, o) {
			return protoErrorf("the database accepted protocol option %q, which pgmfa does not know and cannot carry", truncate([]byte(o)))
		}
	}
	return nil
}

// CheckNegotiate checks a NegotiateProtocolVersion against the request it
// answers: the protocol version the client asked for and the _pq_.* options
// it sent. The rules are libpq 18's (see the comment at the top of this
// file); pgproto3 keeps the whole version (3<<16 | minor) in
// NewestMinorProtocol.
func CheckNegotiate(m *pgproto3.NegotiateProtocolVersion, asked uint32, sent []string) error {
	v := m.NewestMinorProtocol
	switch {
	case v > asked:
		return protoErrorf("NegotiateProtocolVersion offers %d.%d, higher than the %d.%d asked for", v>>16, v&0xffff, asked>>16, asked&0xffff)
	case v < pgproto3.ProtocolVersion30:
		return protoErrorf("NegotiateProtocolVersion offers %d.%d, older than 3.0", v>>16, v&0xffff)
	case v == 3<<16|1:
		return protoErrorf("NegotiateProtocolVersion offers 3.1, a version that never existed")
	case v == asked && len(m.UnrecognizedOptions) == 0:
		return protoErrorf("NegotiateProtocolVersion asks for no change")
	}
	for i, o := range m.UnrecognizedOptions {
		if !strings.HasPrefix(o, "_pq_.") {
			return protoErrorf("NegotiateProtocolVersion names %q, not a _pq_ option", truncate([]byte(o)))
		}
		if !contains(sent, o) {
			return protoErrorf("NegotiateProtocolVersion names option %q, which the client never sent", truncate([]byte(o)))
		}
		if contains(m.UnrecognizedOptions[:i], o) {
			return protoErrorf("NegotiateProtocolVersion names option %q twice", truncate([]byte(o)))
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
