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
	Reason  string // mfa.Reason* or bad_request, unauthorized, browser, ...
	Message string
	Hint    string
	// Waiting lists the waiting logins when an approval named none of
	// several (Reason mfa.ReasonSeveral).
	Waiting []mfa.Pending
}

func (e *Error) Error() string {
	if e.Hint == "" {
		return e.Message
	}
	return e.Message + " (" + e.Hint + ")"
}

// Client calls the admin API of one pgmfa.
type Client struct {
	// Addr is a unix-socket path or a loopback host:port.
	Addr string
	// Token is sent on TCP (ReadToken); unused on the unix socket.
	Token string
}

// ApproveOptions say which waiting login an approval releases: ConnID's, or
// with All every login of the user; neither: the user's only waiting login.
type ApproveOptions struct {
	ConnID uint64
	All    bool
}

// Approve asks pgmfa to release the waiting login of user that opts name
// with code, and returns the released logins. A refusal is an *Error; when
// several logins of user wait and opts name none, its Waiting lists them.
func (c Client) Approve(ctx context.Context, user, code string, opts ApproveOptions) ([]mfa.Pending, error) {
	var resp approveResponse
	err := c.call(ctx, http.MethodPost, "/v1/approve", approveRequest{User: user, Code: code, ConnID: opts.ConnID, All: opts.All}, &resp)
	return resp.Released, err
}

// List returns the logins waiting for approval, oldest first.
func (c Client) List(ctx context.Context) ([]mfa.Pending, error) {
	var resp pendingResponse
	err := c.call(ctx, http.MethodGet, "/v1/pending", nil, &resp)
	return resp.Pending, err
}

// call does one request; every call gets its own transport, as the CLI
// makes one or two calls per run.
func (c Client) call(ctx context.Context, method, path string, in, out any) error {
	addr := c.Addr
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	base := "http://" + addr
	// Proxy unset: never through $HTTP_PROXY, which would see the token.
	tr := &http.Transport{DisableKeepAlives: true}
	if IsUnix(addr) {
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
	if !IsUnix(addr) && c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := (&http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}).Do(req)
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
		return &Error{Status: resp.StatusCode, Reason: e.Reason, Message: e.Error, Hint: e.Hint, Waiting: e.Pending}
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
