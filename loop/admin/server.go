package admin

import (
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"

	"github.com/pgmfa/pgmfa/mfa"
)

// Server is the admin API's http.Handler.
type Server struct {
	approvals *mfa.Approvals
	log       *slog.Logger
	mux       *http.ServeMux
	stats     atomic.Pointer[func() any]
}

// NewServer returns the handler of the admin API over approvals. logger may
// be nil (no logs).
func NewServer(approvals *mfa.Approvals, logger *slog.Logger) *Server {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{approvals: approvals, log: logger, mux: http.NewServeMux()}
	s.mux.HandleFunc("POST /v1/approve", s.approve)
	s.mux.HandleFunc("GET /v1/pending", s.pending)
	s.mux.HandleFunc("GET /v1/healthz", s.healthz)
	s.mux.HandleFunc("GET /v1/stats", s.serveStats)
	return s
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

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mux.ServeHTTP(w, r)
}

func (s *Server) approve(w http.ResponseWriter, r *http.Request) {
	var req approveRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, errorResponse{Error: "malformed request: " + err.Error(), Reason: "bad_request"})
		return
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		writeError(w, http.StatusBadRequest, errorResponse{Error: "malformed request: trailing data", Reason: "bad_request"})
		return
	}
	req.User = strings.TrimSpace(req.User)
	if req.User == "" || strings.TrimSpace(req.Code) == "" {
		writeError(w, http.StatusBadRequest, errorResponse{Error: "user and code are required", Reason: "bad_request"})
		return
	}
	released, o := s.approvals.Approve(req.User, req.Code, req.ConnID)
	// One line per approval; the code never appears.
	attrs := append([]any{"user", req.User, "result", result(o)}, peerAttrs(r.Context())...)
	if req.ConnID != 0 {
		attrs = append(attrs, "conn", req.ConnID)
	}
	if !o.OK {
		attrs = append(attrs, "reason", o.Reason)
		s.log.Warn("admin approval refused", attrs...)
		writeError(w, statusOf(o.Reason), errorResponse{Error: o.Message, Hint: o.Hint, Reason: o.Reason})
		return
	}
	ids := make([]uint64, len(released))
	for i, p := range released {
		ids[i] = p.ID
	}
	s.log.Info("admin approval", append(attrs, "released", ids)...)
	if released == nil {
		released = []mfa.Pending{}
	}
	writeJSON(w, http.StatusOK, approveResponse{Released: released})
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
	case mfa.ReasonMalformed:
		return http.StatusBadRequest
	}
	return http.StatusForbidden
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, e errorResponse) {
	writeJSON(w, status, e)
}
