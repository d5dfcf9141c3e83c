package admin

import "github.com/pgmfa/pgmfa/mfa"

// approveRequest is the body of POST /v1/approve.
type approveRequest struct {
	User   string `json:"user"`
	Code   string `json:"code"`
	ConnID uint64 `json:"conn_id,omitempty"`
}

// approveResponse is the answer to a successful approval.
type approveResponse struct {
	Released []mfa.Pending `json:"released"`
}

// pendingResponse is the answer to GET /v1/pending.
type pendingResponse struct {
	Pending []mfa.Pending `json:"pending"`
}

// errorResponse is every failure's body.
type errorResponse struct {
	Error  string `json:"error"`
	Hint   string `json:"hint,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// maxBody bounds request bodies: an approval is a few dozen bytes.
const maxBody = 4 << 10
