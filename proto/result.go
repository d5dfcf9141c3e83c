package proto

import "github.com/jackc/pgx/v5/pgproto3"

// LoginResult is what a finished login with the database leaves behind: the
// messages the database sent from AuthenticationOk to ReadyForQuery, held
// back from the client until MFA has passed.
type LoginResult struct {
	// Method is the primary authentication the server asked for: "trust",
	// "password", "md5" or "scram-sha-256".
	Method string
	// Params are the ParameterStatus messages in arrival order.
	Params []pgproto3.ParameterStatus
	// Key is the server's cancel key (nil if it sent none).
	Key *pgproto3.BackendKeyData
	// Negotiate is the server's NegotiateProtocolVersion, if it sent one.
	Negotiate *pgproto3.NegotiateProtocolVersion
	// NegotiateSent: the client already has Negotiate (passthrough forwards
	// it as it comes); otherwise AppendReady sends it first.
	NegotiateSent bool
	// Notices are NoticeResponses received after AuthenticationOk, in wire
	// form, to replay to the client.
	Notices [][]byte
	// TxStatus is the status byte of ReadyForQuery.
	TxStatus byte
}

// AppendReady appends what the client gets once MFA passed, in order:
// the server's NegotiateProtocolVersion unless already sent (a client that
// asked for 3.2 or sent _pq_.* options learns what the database granted
// before its AuthenticationOk, as libpq requires), AuthenticationOk, every
// ParameterStatus, BackendKeyData(key) (the proxy's
// own key; omitted if key is nil), the held notices and ReadyForQuery.
func (r *LoginResult) AppendReady(dst []byte, key *pgproto3.BackendKeyData) []byte {
	if r.Negotiate != nil && !r.NegotiateSent {
		dst = Append(dst, r.Negotiate)
	}
	dst = Append(dst, &pgproto3.AuthenticationOk{})
	for i := range r.Params {
		dst = Append(dst, &r.Params[i])
	}
	if key != nil {
		dst = Append(dst, key)
	}
	for _, n := range r.Notices {
		dst = append(dst, n...)
	}
	tx := r.TxStatus
	if tx == 0 {
		tx = 'I'
	}
	return Append(dst, &pgproto3.ReadyForQuery{TxStatus: tx})
}
