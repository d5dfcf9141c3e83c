package admin

import "github.com/pgmfa/pgmfa/mfa"

// approveRequest is the body of POST /v1/approve.
type approveRequest struct {
	User   string `json:"user"`
	Code   string `json:"code"`
	ConnID uint64 `json:"conn_id,omitempty"`
	All    bool   `json:"all,omitempty"`
}

// approveResponse is the answer to a successful approval.
type approveResponse struct {
	Released []mfa.Pending `json:"released"`
}

// pendingResponse is the answer to GET /v1/pending.
type pendingResponse struct {
	Pending []mfa.Pending `json:"pending"`
}

// errorResponse is every failure's body. Pending lists the waiting logins
// to choose from when an approval named none of several (409).
type errorResponse struct {
	Error   string        `json:"error"`
	Hint    string        `json:"hint,omitempty"`
	Reason  string        `json:"reason,omitempty"`
	Pending []mfa.Pending `json:"pending,omitempty"`
}

// maxBody bounds request bodies: an approval is a few dozen bytes.
const maxBody = 4 << 10
