package admin

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"time"
)

// Session is one live handed-off session, as GET /v1/sessions lists it.
type Session struct {
	ID       uint64 `json:"id"` // the connection id (conn= in the log)
	User     string `json:"user"`
	Database string `json:"database"`
	Client   string `json:"client"`
	// Mode is sockmap (spliced in the kernel), relay (user-space relay)
	// or tls-relay (the TLS driver's relay).
	Mode string `json:"mode"`
	// Bytes moved so far; for a spliced session, the kernel's counters.
	ClientToServer uint64    `json:"client_to_server"`
	ServerToClient uint64    `json:"server_to_client"`
	Since          time.Time `json:"since"`
	AgeSeconds     float64   `json:"age_seconds"`
}

// Sessions is what the admin API lists and ends sessions through.
type Sessions interface {
	// List returns the live sessions.
	List() []Session
	// Kill ends one, its database session included, and returns what it
	// was; ErrNoSession when id names no live session.
	Kill(id uint64) (Session, error)
}

// ErrNoSession is Sessions.Kill's answer for an id of no live session.
var ErrNoSession = errors.New("no live session has this id")

// SetSessions sets what GET /v1/sessions and POST /v1/sessions/kill serve;
// without it they answer 404. Safe to call while serving.
func (s *Server) SetSessions(ss Sessions) {
	s.sessions.Store(&ss)
}

type sessionsResponse struct {
	Sessions []Session `json:"sessions"`
}

type killRequest struct {
	ConnID uint64 `json:"conn_id"`
}

type killResponse struct {
	Ended Session `json:"ended"`
}

func (s *Server) sessionsProvider(w http.ResponseWriter) Sessions {
	p := s.sessions.Load()
	if p == nil {
		writeError(w, http.StatusNotFound, errorResponse{Error: "this proxy does not list sessions", Reason: "no_sessions"})
		return nil
	}
	return *p
}

func (s *Server) listSessions(w http.ResponseWriter, r *http.Request) {
	ss := s.sessionsProvider(w)
	if ss == nil {
		return
	}
	list := ss.List()
	if list == nil {
		list = []Session{}
	}
	writeJSON(w, http.StatusOK, sessionsResponse{Sessions: list})
}

func (s *Server) killSession(w http.ResponseWriter, r *http.Request) {
	ss := s.sessionsProvider(w)
	if ss == nil {
		return
	}
	var req killRequest
	if !decodeRequest(w, r, &req) {
		return
	}
	if req.ConnID == 0 {
		writeError(w, http.StatusBadRequest, errorResponse{Error: "conn_id is required", Reason: "bad_request"})
		return
	}
	attrs := append([]any{"conn", req.ConnID}, peerOf(r.Context()).attrs()...)
	ended, err := ss.Kill(req.ConnID)
	if errors.Is(err, ErrNoSession) {
		s.log.Warn("admin session kill refused: no such session", attrs...)
		writeError(w, http.StatusNotFound, errorResponse{Error: "no live session has id " + strconv.FormatUint(req.ConnID, 10), Reason: "no_session",
			Hint: "pgmfa sessions lists the live sessions and their ids"})
		return
	}
	if err != nil {
		s.log.Error("admin session kill failed", append(attrs, "err", err.Error())...)
		writeError(w, http.StatusInternalServerError, errorResponse{Error: err.Error(), Reason: "kill_failed"})
		return
	}
	s.log.Info("admin session kill", append(attrs, "user", ended.User, "database", ended.Database, "mode", ended.Mode)...)
	writeJSON(w, http.StatusOK, killResponse{Ended: ended})
}

// ListSessions returns the live sessions.
func (c Client) ListSessions(ctx context.Context) ([]Session, error) {
	var resp sessionsResponse
	err := c.call(ctx, http.MethodGet, "/v1/sessions", nil, &resp)
	return resp.Sessions, err
}

// KillSession ends the session id and returns what it was. An unknown id is
// an *Error with Reason "no_session".
func (c Client) KillSession(ctx context.Context, id uint64) (Session, error) {
	var resp killResponse
	err := c.call(ctx, http.MethodPost, "/v1/sessions/kill", killRequest{ConnID: id}, &resp)
	return resp.Ended, err
}
