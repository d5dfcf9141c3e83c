package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"

	"github.com/pgmfa/pgmfa/mfa"
)

// Error is a refusal from the admin API.
type Error struct {
	Status  int    // HTTP status
	Reason  string // mfa.Reason* or bad_request
	Message string
	Hint    string
}

func (e *Error) Error() string {
	if e.Hint == "" {
		return e.Message
	}
	return e.Message + " (" + e.Hint + ")"
}

// Approve asks the pgmfa at addr to release the logins of user waiting for
// approval (only connID's when it is not 0) with code, and returns the
// released logins. A refusal is an *Error.
func Approve(ctx context.Context, addr, user, code string, connID uint64) ([]mfa.Pending, error) {
	var resp approveResponse
	err := call(ctx, addr, http.MethodPost, "/v1/approve", approveRequest{User: user, Code: code, ConnID: connID}, &resp)
	return resp.Released, err
}

// List returns the logins waiting for approval at addr, oldest first.
func List(ctx context.Context, addr string) ([]mfa.Pending, error) {
	var resp pendingResponse
	err := call(ctx, addr, http.MethodGet, "/v1/pending", nil, &resp)
	return resp.Pending, err
}

// Stats returns the raw JSON of GET /v1/stats.
func Stats(ctx context.Context, addr string) (json.RawMessage, error) {
	var raw json.RawMessage
	err := call(ctx, addr, http.MethodGet, "/v1/stats", nil, &raw)
	return raw, err
}

// Health reports whether the admin API at addr answers.
func Health(ctx context.Context, addr string) error {
	return call(ctx, addr, http.MethodGet, "/v1/healthz", nil, nil)
}

// call does one request; every call gets its own transport, as the CLI
// makes one or two calls per run.
func call(ctx context.Context, addr, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	base := "http://" + addr
	tr := &http.Transport{DisableKeepAlives: true}
	if isUnix(addr) {
		base = "http://pgmfa"
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", addr)
		}
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, method, base+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return unreachable(addr, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("admin API at %s: %w", addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e errorResponse
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			return &Error{Status: resp.StatusCode, Message: fmt.Sprintf("admin API at %s answered %s", addr, resp.Status)}
		}
		return &Error{Status: resp.StatusCode, Reason: e.Reason, Message: e.Error, Hint: e.Hint}
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("admin API at %s: bad answer: %w", addr, err)
	}
	return nil
}

// unreachable says what to check when the API cannot be reached.
func unreachable(addr string, err error) error {
	switch {
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("cannot reach the pgmfa admin API at %s: %w (is `pgmfa serve` running with --admin %s?)", addr, err, addr)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("cannot reach the pgmfa admin API at %s: %w (run as the user pgmfa runs as, or root)", addr, err)
	}
	return fmt.Errorf("cannot reach the pgmfa admin API at %s: %w", addr, err)
}
