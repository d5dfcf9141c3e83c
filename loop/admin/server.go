package admin

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
)

// Server is the admin API's http.Handler.
type Server struct {
	approvals *mfa.Approvals
	log       *slog.Logger
	token     []byte // the credential of TCP requests; empty: TCP refused
	mux       *http.ServeMux
	stats     atomic.Pointer[func() any]
	sessions  atomic.Pointer[Sessions]
}

// NewServer returns the handler of the admin API over approvals. logger may
// be nil (no logs). token is the credential every request over TCP must
// carry (see LoadOrCreateToken); with an empty token, TCP requests are
// refused and only the unix socket serves. Serve it with HTTPServer, which
// wires ConnContext.
func NewServer(approvals *mfa.Approvals, logger *slog.Logger, token string) *Server {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{approvals: approvals, log: logger, token: []byte(token), mux: http.NewServeMux()}
	s.mux.HandleFunc("POST /v1/approve", s.approve)
	s.mux.HandleFunc("GET /v1/pending", s.pending)
	s.mux.HandleFunc("GET /v1/healthz", s.healthz)
	s.mux.HandleFunc("GET /v1/stats", s.serveStats)
	s.mux.HandleFunc("GET /v1/sessions", s.listSessions)
	s.mux.HandleFunc("POST /v1/sessions/kill", s.killSession)
	return s
}

// HTTPServer returns an http.Server for this handler: ConnContext wired
// (the access checks depend on it) and every phase of a request bounded in
// time and size.
func (s *Server) HTTPServer() *http.Server {
	return &http.Server{
		Handler:           s,
		ConnContext:       s.ConnContext,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       30 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
}

// SetStats sets what GET /v1/stats serves (JSON-encoded); nil unsets it.
// Safe to call while serving.
func (s *Server) SetStats(f func() any) {
	if f == nil {
		s.stats.Store(nil)
		return
	}
	s.stats.Store(&f)
}

// ServeHTTP implements http.Handler: the access checks, then the API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := peerOf(r.Context())
	if status, e, ok := s.admit(p, r); !ok {
		if status == http.StatusUnauthorized {
			w.Header().Set("WWW-Authenticate", `Bearer realm="pgmfa admin"`)
		}
		attrs := []any{"method", r.Method, "path", r.URL.Path, "reason", e.Reason, "remote", r.RemoteAddr}
		if p.unix {
			// A TCP request refused here has proved no identity.
			attrs = append(attrs, p.attrs()...)
		}
		s.log.Warn("admin request refused", attrs...)
		writeError(w, status, e)
		return
	}
	s.mux.ServeHTTP(w, r)
}

// admit applies the access checks (see the package comment).
func (s *Server) admit(p peer, r *http.Request) (int, errorResponse, bool) {
	if r.Header.Get("Origin") != "" || r.Header.Get("Sec-Fetch-Site") != "" || r.Header.Get("Sec-Fetch-Mode") != "" {
		return http.StatusForbidden, errorResponse{Reason: "browser",
			Error: "the admin API does not serve web browsers",
			Hint:  "use pgmfa approve"}, false
	}
	if !p.unix {
		if !hostIsListenAddr(r.Host, p.local) {
			return http.StatusForbidden, errorResponse{Reason: "bad_host",
				Error: "Host " + quote(r.Host) + " is not the address the admin API listens on",
				Hint:  "connect to " + p.local + " (or localhost with its port)"}, false
		}
		if len(s.token) == 0 {
			return http.StatusUnauthorized, errorResponse{Reason: "unauthorized",
				Error: "this admin API serves only its unix socket"}, false
		}
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), s.token) != 1 {
			return http.StatusUnauthorized, errorResponse{Reason: "unauthorized",
				Error: "the admin API over TCP requires its token",
				Hint:  "pgmfa approve reads it from --admin-token-file (the file pgmfa serve wrote; readable by pgmfa's user and root only)"}, false
		}
	}
	if r.Method == http.MethodPost {
		mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
		if err != nil || mt != "application/json" {
			return http.StatusUnsupportedMediaType, errorResponse{Reason: "bad_content_type",
				Error: "requests must be Content-Type: application/json"}, false
		}
	}
	return 0, errorResponse{}, true
}

// hostIsListenAddr reports whether a request's Host names the address the
// connection was accepted on: exactly, or as localhost with its port. A
// name that resolves to loopback by other means (DNS rebinding) does not.
func hostIsListenAddr(host, local string) bool {
	if local == "" || host == "" {
		return false
	}
	if host == local {
		return true
	}
	h, port, err := net.SplitHostPort(host)
	_, lport, lerr := net.SplitHostPort(local)
	return err == nil && lerr == nil && port == lport && strings.EqualFold(h, "localhost")
}

func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// decodeRequest reads a request body of one JSON object into v: no
// unknown field, nothing after it, at most maxBody bytes. On failure it has
// answered 400 and returns false.
func decodeRequest(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, errorResponse{Error: "malformed request: " + err.Error(), Reason: "bad_request"})
		return false
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		writeError(w, http.StatusBadRequest, errorResponse{Error: "malformed request: trailing data", Reason: "bad_request"})
		return false
	}
	return true
}

func (s *Server) approve(w http.ResponseWriter, r *http.Request) {
	var req approveRequest
	if !decodeRequest(w, r, &req) {
		return
	}
	req.User = strings.TrimSpace(req.User)
	if req.User == "" || strings.TrimSpace(req.Code) == "" {
		writeError(w, http.StatusBadRequest, errorResponse{Error: "user and code are required", Reason: "bad_request"})
		return
	}
	if req.ConnID != 0 && req.All {
		writeError(w, http.StatusBadRequest, errorResponse{Error: "conn_id and all exclude each other", Reason: "bad_request"})
		return
	}
	p := peerOf(r.Context())
	res := s.approvals.Approve(mfa.Approval{User: req.User, Code: req.Code, ConnID: req.ConnID, All: req.All, Approver: p.approver()})
	// One line per approval; the code never appears.
	attrs := append([]any{"user", req.User, "result", result(res.Outcome)}, p.attrs()...)
	if req.ConnID != 0 {
		attrs = append(attrs, "conn", req.ConnID)
	}
	if req.All {
		attrs = append(attrs, "all", true)
	}
	if !res.OK {
		attrs = append(attrs, "reason", res.Reason)
		if res.Reason == mfa.ReasonSeveral {
			attrs = append(attrs, "waiting", ids(res.Waiting))
		}
		s.log.Warn("admin approval refused", attrs...)
		writeError(w, statusOf(res.Reason), errorResponse{Error: res.Message, Hint: res.Hint, Reason: res.Reason, Pending: res.Waiting})
		return
	}
	s.log.Info("admin approval", append(attrs, "released", ids(res.Released))...)
	released := res.Released
	if released == nil {
		released = []mfa.Pending{}
	}
	writeJSON(w, http.StatusOK, approveResponse{Released: released})
}

func ids(ps []mfa.Pending) []uint64 {
	out := make([]uint64, len(ps))
	for i, p := range ps {
		out[i] = p.ID
	}
	return out
}

func (s *Server) pending(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, pendingResponse{Pending: s.approvals.List()})
}

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
}

func (s *Server) serveStats(w http.ResponseWriter, r *http.Request) {
	f := s.stats.Load()
	if f == nil {
		writeError(w, http.StatusNotFound, errorResponse{Error: "no statistics are available", Reason: "no_stats"})
		return
	}
	writeJSON(w, http.StatusOK, (*f)())
}

func result(o mfa.Outcome) string {
	if o.OK {
		return "ok"
	}
	return "refused"
}

// statusOf maps a refusal's reason to an HTTP status the client can branch on.
func statusOf(reason string) int {
	switch reason {
	case mfa.ReasonThrottled:
		return http.StatusTooManyRequests
	case mfa.ReasonNotWaiting, mfa.ReasonNotEnrolled:
		return http.StatusNotFound
	case mfa.ReasonSeveral:
		return http.StatusConflict
	case mfa.ReasonMalformed:
		return http.StatusBadRequest
	case mfa.ReasonStore, mfa.ReasonStoreDown:
		return http.StatusServiceUnavailable
	}
	return http.StatusForbidden
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, e errorResponse) {
	writeJSON(w, status, e)
}
