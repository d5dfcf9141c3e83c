package web

import (
	"crypto/subtle"
	_ "embed"
	"errors"
	"html/template"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
)

// maxBody bounds a form: a code, a user name, a token and two ids.
const maxBody = 8 << 10

// Cookie names. "__Host-" (over TLS) pins a cookie to this origin: no
// Domain, Path=/, Secure.
const (
	sessionCookie = "pgmfa_session"
	preCookie     = "pgmfa_pre" // CSRF token of the sign-in forms (no session yet)
)

// csp allows nothing but this page's own forms, its one stylesheet and
// its one script file (passkeys), which may talk to this origin only: no
// inline script or style, no frames, no other origin.
const csp = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// passkeyJS is the page's only script: the browser side of the WebAuthn
// ceremonies (navigator.credentials), with no library.
//
//go:embed passkey.js
var passkeyJS []byte

// pageCSS is the page's stylesheet; the page reads without it.
//
//go:embed page.css
var pageCSS []byte

// Handler is the page's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.home)
	mux.HandleFunc("GET /l/{token}", s.linkPage)
	mux.HandleFunc("POST /signin", s.signIn)
	mux.HandleFunc("POST /decide", s.decide)
	mux.HandleFunc("POST /signout", s.signOut)
	mux.HandleFunc("GET /enroll/{token}", s.enrollPage)
	mux.HandleFunc("POST /enroll/{token}/begin", s.enrollBegin)
	mux.HandleFunc("POST /enroll/{token}/finish", s.enrollFinish)
	mux.HandleFunc("POST /passkey/begin", s.passkeyBegin)
	mux.HandleFunc("POST /passkey/finish", s.passkeyFinish)
	mux.HandleFunc("GET /static/passkey.js", static("text/javascript; charset=utf-8", passkeyJS))
	mux.HandleFunc("GET /static/page.css", static("text/css; charset=utf-8", pageCSS))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", csp)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		// The link's token is in the URL: never send it on.
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-store")
		if s.cfg.Secure {
			h.Set("Strict-Transport-Security", "max-age=31536000")
		}
		limit := int64(maxBody)
		if strings.HasSuffix(r.URL.Path, "/finish") {
			limit = maxJSONBody
		}
		r.Body = http.MaxBytesReader(w, r.Body, limit)
		mux.ServeHTTP(w, r)
	})
}

// static serves an embedded file.
func static(contentType string, body []byte) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		_, _ = w.Write(body)
	}
}

func (s *Server) cookieName(base string) string {
	if s.cfg.Secure {
		return "__Host-" + base
	}
	return base
}

func (s *Server) setCookie(w http.ResponseWriter, name, value string, maxAge time.Duration) {
	http.SetCookie(w, &http.Cookie{
		Name: s.cookieName(name), Value: value, Path: "/", MaxAge: int(maxAge / time.Second),
		Secure: s.cfg.Secure, HttpOnly: true, SameSite: http.SameSiteStrictMode,
	})
}

// preToken returns the sign-in CSRF token, setting its cookie when new
// (double submit: the form must carry the cookie's value, which another
// site can neither read nor set).
func (s *Server) preToken(w http.ResponseWriter, r *http.Request) string {
	if c, err := r.Cookie(s.cookieName(preCookie)); err == nil && len(c.Value) == 43 {
		return c.Value
	}
	t := randomToken()
	s.setCookie(w, preCookie, t, s.cfg.LinkTTL+s.cfg.SessionTTL)
	return t
}

// current returns the request's session (nil: none or expired) and its key.
func (s *Server) current(r *http.Request) (*session, string) {
	c, err := r.Cookie(s.cookieName(sessionCookie))
	if err != nil {
		return nil, ""
	}
	key := hash(c.Value)
	s.mu.Lock()
	defer s.mu.Unlock()
	se, ok := s.sessions[key]
	if !ok || !s.cfg.Now().Before(se.expires) {
		delete(s.sessions, key)
		return nil, ""
	}
	cp := *se
	return &cp, key
}

func same(a, b string) bool {
	return a != "" && subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// row is a login on the page.
type row struct {
	Kind, ID                             string
	Addr, Database, AppName, Since, Left string
}

type pageData struct {
	Title, Message, Error string
	User, CSRF            string
	Rows                  []row
	// sign-in form
	SignIn     bool
	FixedUser  string // from a link: the form asks for the code only
	Token      string // the link's token, carried by its sign-in form
	LinkDetail *row
	Status     int
	// Passkeys: offer a passkey (the script); Enroll: the page of an
	// enrollment link.
	Passkeys, Enroll bool
}

// home: the signed-in user's logins, or the sign-in form.
func (s *Server) home(w http.ResponseWriter, r *http.Request) {
	se, _ := s.current(r)
	if se == nil {
		s.render(w, pageData{Title: "Sign in", SignIn: true, CSRF: s.preToken(w, r), Passkeys: s.rp != nil})
		return
	}
	s.render(w, pageData{Title: "Your logins", User: se.user, CSRF: se.csrf, Rows: s.rows(se.user)})
}

// linkPage: the sign-in form for the login a link names.
func (s *Server) linkPage(w http.ResponseWriter, r *http.Request) {
	lk, ok := s.openLink(r.PathValue("token"))
	if !ok {
		s.gone(w)
		return
	}
	if se, _ := s.current(r); se != nil && se.user == lk.login.User {
		// Signed in already: the start page lists this login too, and a
		// second sign-in would cost the user another code.
		http.Redirect(w, r, "/", http.StatusSeeOther)
		return
	}
	d := rowOf(lk, s.cfg.Now())
	s.render(w, pageData{Title: "Approve a database login", SignIn: true, FixedUser: lk.login.User, Token: r.PathValue("token"),
		LinkDetail: &d, CSRF: s.preToken(w, r), Passkeys: s.rp != nil})
}

func (s *Server) gone(w http.ResponseWriter) {
	s.render(w, pageData{Status: http.StatusGone, Title: "Link not valid",
		Error: "This link was already used or has expired. Connect again to get a new one, or sign in on the start page."})
}

// openLink returns a copy of the unused, unexpired link of token.
func (s *Server) openLink(token string) (link, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	lk, ok := s.links[hash(token)]
	if !ok || lk.used || lk.done || !s.cfg.Now().Before(lk.expires) {
		return link{}, false
	}
	return *lk, true
}

// signIn verifies a TOTP code for the user (typed, or the link's) and
// starts a session. The code is spent like one sent with a login.
func (s *Server) signIn(w http.ResponseWriter, r *http.Request) {
	if !s.form(w, r) {
		return
	}
	pre, err := r.Cookie(s.cookieName(preCookie))
	if err != nil || !same(r.PostFormValue("csrf"), pre.Value) {
		s.forbidden(w)
		return
	}
	user, token := strings.TrimSpace(r.PostFormValue("user")), r.PostFormValue("token")
	if token != "" {
		lk, ok := s.openLink(token)
		if !ok {
			s.gone(w)
			return
		}
		user = lk.login.User
	}
	if user == "" || len(user) > 63 {
		s.render(w, pageData{Status: http.StatusBadRequest, Title: "Sign in", SignIn: true, CSRF: pre.Value, Error: "Enter your database user name."})
		return
	}
	o := s.cfg.Guard.VerifyPage(user, r.RemoteAddr, r.PostFormValue("code"))
	if !o.OK {
		s.countSignIn(MethodTOTP, false)
		s.log.Warn("sign-in on the approval page refused", "user", user, "web_client", r.RemoteAddr, "reason", o.Reason)
		status := http.StatusUnauthorized
		if o.Reason == mfa.ReasonThrottled {
			status = http.StatusTooManyRequests
		}
		d := pageData{Status: status, Title: "Sign in", SignIn: true, CSRF: pre.Value, Error: o.Message, Passkeys: s.rp != nil}
		if token != "" {
			d.FixedUser, d.Token = user, token
		}
		s.render(w, d)
		return
	}
	if s.startSession(w, r, user, token, MethodTOTP) {
		http.Redirect(w, r, "/", http.StatusSeeOther)
	}
}

// startSession signs user in (they proved who they are by method) and
// uses up the login link token, if any. false: it answered the refusal.
func (s *Server) startSession(w http.ResponseWriter, r *http.Request, user, token, method string) bool {
	sid := randomToken()
	now := s.cfg.Now()
	s.mu.Lock()
	s.sweepLocked(now)
	if len(s.sessions) >= maxSessions {
		s.mu.Unlock()
		http.Error(w, "too many sessions on the approval page; try again in a few minutes", http.StatusServiceUnavailable)
		return false
	}
	s.sessions[hash(sid)] = &session{user: user, method: method, csrf: randomToken(), expires: now.Add(s.cfg.SessionTTL)}
	if token != "" {
		// Single use: the link has done its job.
		if lk, ok := s.links[hash(token)]; ok {
			lk.used = true
		}
	}
	s.mu.Unlock()
	s.countSignIn(method, true)
	s.log.Info("signed in on the approval page", "user", user, "method", method, "web_client", r.RemoteAddr)
	s.setCookie(w, sessionCookie, sid, s.cfg.SessionTTL)
	return true
}

// decide approves or denies one of the signed-in user's logins.
func (s *Server) decide(w http.ResponseWriter, r *http.Request) {
	if !s.form(w, r) {
		return
	}
	se, _ := s.current(r)
	if se == nil {
		s.render(w, pageData{Status: http.StatusUnauthorized, Title: "Sign in", SignIn: true, CSRF: s.preToken(w, r),
			Error: "Your sign-in has expired. Sign in again."})
		return
	}
	if !same(r.PostFormValue("csrf"), se.csrf) {
		s.forbidden(w)
		return
	}
	approve := r.PostFormValue("action") == "approve"
	if !approve && r.PostFormValue("action") != "deny" {
		http.Error(w, "action must be approve or deny", http.StatusBadRequest)
		return
	}
	id, err := strconv.ParseUint(r.PostFormValue("id"), 10, 64)
	if err != nil {
		http.Error(w, "bad login id", http.StatusBadRequest)
		return
	}
	var l mfa.Login
	var ok bool
	switch r.PostFormValue("kind") {
	case "link":
		l, ok = s.decideLink(se.user, id, approve)
	case "wait":
		l, ok = s.decideWaiting(se.user, id, approve)
	default:
		http.Error(w, "bad login kind", http.StatusBadRequest)
		return
	}
	if !ok {
		s.render(w, pageData{Status: http.StatusNotFound, Title: "Your logins", User: se.user, CSRF: se.csrf, Rows: s.rows(se.user),
			Error: "That login is not waiting for you any more (it ended, expired, was decided already, or is not yours)."})
		return
	}
	verb, msg := "denied", "Denied: the login was refused."
	if approve {
		verb = "approved"
		msg = "Approved."
		if r.PostFormValue("kind") == "link" {
			msg = "Approved: connect again from the same address within " + s.cfg.GrantTTL.String() + "."
		}
	}
	// The audit line: who decided, from where, and which login.
	s.log.Info("login "+verb+" on the approval page", "user", se.user, "client", l.Addr, "database", l.Database,
		"application_name", l.AppName, "approver", se.user, "approver_method", se.method, "web_client", r.RemoteAddr)
	s.render(w, pageData{Title: "Your logins", User: se.user, CSRF: se.csrf, Rows: s.rows(se.user), Message: msg})
}

// decideLink decides a refused login (ModeRefer): approving admits the
// user's retry from its IP for GrantTTL.
func (s *Server) decideLink(user string, id uint64, approve bool) (mfa.Login, bool) {
	now := s.cfg.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, lk := range s.links {
		if lk.id != id || lk.login.User != user || lk.done || !now.Before(lk.expires) {
			continue
		}
		if lk.waitID != 0 {
			return mfa.Login{}, false // a waiting login is decided as such
		}
		lk.done, lk.used = true, true
		if approve {
			s.grants[grantKey(user, lk.login.Addr)] = now.Add(s.cfg.GrantTTL)
		}
		return lk.login, true
	}
	return mfa.Login{}, false
}

// decideWaiting releases or ends a login waiting in this process.
func (s *Server) decideWaiting(user string, id uint64, approve bool) (mfa.Login, bool) {
	p, ok := s.cfg.Approvals.Decide(user, id, approve, denied(user))
	if !ok {
		return mfa.Login{}, false
	}
	s.mu.Lock()
	for _, lk := range s.links {
		if lk.waitID == id && lk.login.User == user {
			lk.done, lk.used = true, true
		}
	}
	s.mu.Unlock()
	return mfa.Login{ConnID: p.ID, User: p.User, Addr: p.Addr, Database: p.Database, AppName: p.AppName}, true
}

func denied(user string) mfa.Outcome {
	return mfa.Outcome{Reason: mfa.ReasonDenied, Code: mfa.SQLState,
		Message: "MFA: this login of user \"" + user + "\" was denied on the approval page",
		Hint:    "if you did not start it, someone else has your password: change it"}
}

func (s *Server) signOut(w http.ResponseWriter, r *http.Request) {
	if !s.form(w, r) {
		return
	}
	se, key := s.current(r)
	if se == nil || !same(r.PostFormValue("csrf"), se.csrf) {
		s.forbidden(w)
		return
	}
	s.mu.Lock()
	delete(s.sessions, key)
	s.mu.Unlock()
	s.setCookie(w, sessionCookie, "", -time.Second)
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

// form parses a POST form within maxBody.
func (s *Server) form(w http.ResponseWriter, r *http.Request) bool {
	if err := r.ParseForm(); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			http.Error(w, "request body too large", http.StatusRequestEntityTooLarge)
		} else {
			http.Error(w, "bad form", http.StatusBadRequest)
		}
		return false
	}
	return true
}

func (s *Server) forbidden(w http.ResponseWriter) {
	http.Error(w, "403 forbidden: missing or wrong CSRF token; reload the page and try again", http.StatusForbidden)
}

// rows lists user's logins that wait for a decision: refused ones with
// an open link (ModeRefer) and those waiting in this process.
func (s *Server) rows(user string) []row {
	now := s.cfg.Now()
	var out []row
	s.mu.Lock()
	var lks []*link
	for _, lk := range s.links {
		if lk.login.User == user && lk.waitID == 0 && !lk.done && now.Before(lk.expires) {
			lks = append(lks, lk)
		}
	}
	sort.Slice(lks, func(i, j int) bool { return lks[i].id < lks[j].id })
	for _, lk := range lks {
		out = append(out, rowOf(*lk, now))
	}
	s.mu.Unlock()
	for _, p := range s.cfg.Approvals.Local(user) {
		out = append(out, row{Kind: "wait", ID: strconv.FormatUint(p.ID, 10), Addr: p.Addr, Database: p.Database, AppName: p.AppName,
			Since: p.Since.UTC().Format(sinceFormat), Left: "waiting"})
	}
	return out
}

// sinceFormat is how the page shows when a login started.
const sinceFormat = "2006-01-02 15:04:05 UTC"

func rowOf(lk link, now time.Time) row {
	r := row{Kind: "link", ID: strconv.FormatUint(lk.id, 10), Addr: lk.login.Addr, Database: lk.login.Database, AppName: lk.login.AppName,
		Since: lk.since.UTC().Format(sinceFormat), Left: lk.expires.Sub(now).Round(time.Second).String()}
	if lk.waitID != 0 {
		r.Kind, r.ID = "wait", strconv.FormatUint(lk.waitID, 10)
	}
	return r
}

func (s *Server) render(w http.ResponseWriter, d pageData) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if d.Status != 0 {
		w.WriteHeader(d.Status)
	}
	if err := page.Execute(w, d); err != nil {
		s.log.Warn("approval page: render", "err", err)
	}
}

// page is the whole site: forms, one stylesheet, and the passkey script
// on the pages that offer passkeys.
var page = template.Must(template.New("page").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>pgmfa: {{.Title}}</title><link rel="stylesheet" href="/static/page.css"></head><body>
<h1>{{.Title}}</h1>
{{if .Error}}<p role="alert"><strong>{{.Error}}</strong></p>{{end}}
{{if .Message}}<p role="status">{{.Message}}</p>{{end}}
{{if eq .Status 410}}<p><a href="/">Start page</a></p>{{end}}
{{if .SignIn}}
{{with .LinkDetail}}<p>A login needs your approval: client <code>{{.Addr}}</code>, database <code>{{.Database}}</code>, application <code>{{.AppName}}</code>, at {{.Since}}.</p>{{end}}
<form method="post" action="/signin">
<input type="hidden" name="csrf" value="{{.CSRF}}">
{{if .FixedUser}}<p>User <code>{{.FixedUser}}</code></p><input type="hidden" name="token" value="{{.Token}}">
{{else}}<p><label>Database user <input name="user" autocomplete="username" required></label></p>{{end}}
<p><label>Code from your authenticator app <input name="code" inputmode="numeric" autocomplete="one-time-code" required></label></p>
<p><button type="submit">Sign in</button></p>
</form>
{{if .Passkeys}}<p>or <button type="button" id="passkey-signin" data-token="{{.Token}}" hidden>Sign in with a passkey</button></p>
<p id="passkey-status" role="status"></p>{{end}}
{{else if .Enroll}}
<p>Register a passkey (or a security key) for the database user <code>{{.FixedUser}}</code>. This link works once.</p>
<input type="hidden" name="csrf" value="{{.CSRF}}">
<p><button type="button" id="passkey-register" hidden>Register a passkey</button></p>
<noscript><p>Registering a passkey needs JavaScript.</p></noscript>
<p id="passkey-status" role="status"></p>
{{else if .User}}
<p>Signed in as <code>{{.User}}</code>.</p>
{{if .Rows}}<table>
<tr><th>client address</th><th>database</th><th>application_name</th><th>since</th><th>expires in</th><th></th></tr>
{{range .Rows}}<tr><td>{{.Addr}}</td><td>{{.Database}}</td><td>{{.AppName}}</td><td>{{.Since}}</td><td>{{.Left}}</td><td>
<form method="post" action="/decide"><input type="hidden" name="csrf" value="{{$.CSRF}}"><input type="hidden" name="kind" value="{{.Kind}}"><input type="hidden" name="id" value="{{.ID}}">
<button type="submit" name="action" value="approve">Approve</button> <button type="submit" name="action" value="deny">Deny</button></form>
</td></tr>
{{end}}</table>
{{else}}<p>No login of yours is waiting for approval.</p>{{end}}
<form method="post" action="/signout"><input type="hidden" name="csrf" value="{{.CSRF}}"><button type="submit" class="secondary">Sign out</button></form>
{{end}}
{{if .Passkeys}}<script src="/static/passkey.js"></script>{{end}}
</body></html>
`))
