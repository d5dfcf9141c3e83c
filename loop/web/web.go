// Package web is pgmfa's approval page (`pgmfa serve --web ADDR`): a small
// HTTPS site where a person signs in with a TOTP code or a passkey
// (WebAuthn, passkey.go) and approves or denies their own database logins that need a second factor, plus the
// webhook (--mfa-webhook) that tells them where to go.
//
// Why a link in an error: before AuthenticationOk libpq accepts nothing but
// an authentication request, an error or NegotiateProtocolVersion (a
// NoticeResponse there breaks the login), so a login that waits cannot be
// shown where to approve it. In the "refer" mode (the default) a login
// without a code is therefore refused at once with SQLSTATE 28000 and a
// HINT carrying a one-time link; approving on the page opens a short
// window (Config.GrantTTL) in which that user's retry from the same client
// IP is admitted. In the "wait" mode the login waits as without --web and
// the link goes to the webhook; approving releases the waiting login, and
// a denial ends it at once with 28000.
//
// The page works without JavaScript (plain HTML forms) for TOTP; only
// passkeys need its one script (the browser's WebAuthn API is JavaScript).
// Its sessions are short-lived, its cookies HttpOnly, SameSite=Strict and
// Secure (over TLS), every state change carries a CSRF token, and a TOTP
// sign-in goes through mfa.Guard.VerifyPage: the same per-user and
// per-address throttles and single use as a code on the wire.
//
// What it keeps (links, grants, sessions, WebAuthn challenges) lives in
// this process; passkeys and their enrollment links live in the store: the link
// and the retry must reach the instance that made the link (see README,
// "Approving from a web page").
package web

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-webauthn/webauthn/webauthn"

	"github.com/pgmfa/pgmfa/mfa"
)

// Modes: what happens to a login without a code when --web is on.
const (
	ModeRefer = "refer" // refused at once with a link in the HINT; approving admits the retry
	ModeWait  = "wait"  // waits as without --web; the link goes to the webhook
)

// Defaults of Config.
const (
	DefaultLinkTTL    = 5 * time.Minute
	DefaultGrantTTL   = 2 * time.Minute
	DefaultSessionTTL = 10 * time.Minute
)

// bounds of what clients can make this process keep.
const (
	maxLinksPerUser = 16
	maxLinks        = 10000
	maxSessions     = 10000
)

// Config configures a Server.
type Config struct {
	Guard     *mfa.Guard
	Approvals *mfa.Approvals
	// URL is the page's address as users reach it (https://host:port);
	// links are URL + "/l/" + token.
	URL string
	// Mode is ModeRefer (default) or ModeWait.
	Mode string
	// LinkTTL: how long a link may be used; GrantTTL: how long after an
	// approval the user's retry from the same IP is admitted; SessionTTL:
	// how long a sign-in lasts (absolute, not sliding).
	LinkTTL, GrantTTL, SessionTTL time.Duration
	// Webhook hears of every link made (nil: none).
	Webhook *Webhook
	// Secure marks cookies Secure (the page is served over TLS).
	Secure bool
	// Passkeys, when set, enables passkey (WebAuthn) enrollment and
	// sign-in (passkey.go). It needs a domain name in URL.
	Passkeys mfa.PasskeyStore
	Logger   *slog.Logger
	Now      func() time.Time // tests
}

// Server is the approval page and the gate's view of it (login.Web).
// Safe for concurrent use.
type Server struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	next     uint64
	links    map[string]*link     // sha256(token) → link
	grants   map[string]time.Time // user \0 client IP → admitted until
	sessions map[string]*session  // sha256(session id) → session

	rp         *webauthn.WebAuthn   // nil: passkeys off
	ceremonies map[string]*ceremony // sha256(ceremony id) → started WebAuthn ceremony

	signIns [2][2]atomic.Uint64 // [method: totp, passkey][refused, ok]
}

// Sign-in methods, as the audit lines and SignIns name them.
const (
	MethodTOTP    = "totp"
	MethodPasskey = "passkey"
)

// SignIns counts the page's sign-ins by method (MethodTOTP, MethodPasskey)
// and result, for the metrics.
func (s *Server) SignIns(method string, ok bool) uint64 {
	return s.signIns[methodIndex(method)][b2i(ok)].Load()
}

func (s *Server) countSignIn(method string, ok bool) { s.signIns[methodIndex(method)][b2i(ok)].Add(1) }

func methodIndex(method string) int {
	if method == MethodPasskey {
		return 1
	}
	return 0
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// link is a login that needs approval and the one-time link made for it.
type link struct {
	id      uint64 // the page's name for it in forms (not a secret)
	key     string // sha256 of its token
	login   mfa.Login
	since   time.Time
	expires time.Time
	waitID  uint64 // ModeWait: the waiting login's id (mfa.Pending.ID)
	used    bool   // the token signed someone in: it opens nothing more
	done    bool   // approved or denied
}

type session struct {
	user    string
	method  string // how the user proved who they are: totp or passkey (the audit line says)
	csrf    string
	expires time.Time
}

// New returns a Server; cfg.Guard and cfg.Approvals are required.
func New(cfg Config) (*Server, error) {
	if cfg.Guard == nil || cfg.Approvals == nil {
		return nil, fmt.Errorf("web: a Guard and Approvals are required")
	}
	switch cfg.Mode {
	case "":
		cfg.Mode = ModeRefer
	case ModeRefer, ModeWait:
	default:
		return nil, fmt.Errorf("--web-mode must be %s or %s, not %q", ModeRefer, ModeWait, cfg.Mode)
	}
	if !strings.HasPrefix(cfg.URL, "https://") && !strings.HasPrefix(cfg.URL, "http://") {
		return nil, fmt.Errorf("--web-url must be an http(s):// URL, not %q", cfg.URL)
	}
	cfg.URL = strings.TrimRight(cfg.URL, "/")
	if cfg.LinkTTL <= 0 {
		cfg.LinkTTL = DefaultLinkTTL
	}
	if cfg.GrantTTL <= 0 {
		cfg.GrantTTL = DefaultGrantTTL
	}
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = DefaultSessionTTL
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{cfg: cfg, log: cfg.Logger, links: map[string]*link{}, grants: map[string]time.Time{}, sessions: map[string]*session{},
		ceremonies: map[string]*ceremony{}}
	if cfg.Passkeys != nil {
		rp, err := newRelyingParty(cfg.URL)
		if err != nil {
			// TOTP still works: say why passkeys do not.
			cfg.Logger.Warn("passkeys are off on the approval page", "err", err)
		}
		s.rp = rp
	}
	return s, nil
}

// PasskeysOn reports whether the page enrolls and accepts passkeys.
func (s *Server) PasskeysOn() bool { return s.rp != nil }

// Admitted reports whether user connecting from addr was approved on the
// page within GrantTTL, for addr's IP. In memory: it runs on event loops.
func (s *Server) Admitted(user, addr string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	until, ok := s.grants[grantKey(user, addr)]
	return ok && s.cfg.Now().Before(until)
}

// Refer makes a link for l and, in ModeRefer, refuses l with it.
func (s *Server) Refer(l mfa.Login) (mfa.Outcome, bool) {
	if s.cfg.Mode != ModeRefer {
		return mfa.Outcome{}, false
	}
	token, lk := s.newLink(l, 0)
	s.notify("login_refused", lk, token)
	return mfa.Outcome{
		Reason: mfa.ReasonWebLink, Code: mfa.SQLState,
		Message: fmt.Sprintf("MFA approval needed for user %q: approve this login on the web page, then connect again", l.User),
		Hint: fmt.Sprintf("open %s (single use, valid for %s), sign in with your authenticator code and approve; then retry from the same address within %s",
			s.url(token), s.cfg.LinkTTL, s.cfg.GrantTTL),
	}, true
}

// Waiting makes a link for a login that started waiting (ModeWait) and
// sends it to the webhook.
func (s *Server) Waiting(p mfa.Pending) {
	if s.cfg.Mode != ModeWait {
		return
	}
	token, lk := s.newLink(mfa.Login{ConnID: p.ID, User: p.User, Addr: p.Addr, Database: p.Database, AppName: p.AppName}, p.ID)
	s.notify("login_waiting", lk, token)
}

func (s *Server) url(token string) string { return s.cfg.URL + "/l/" + token }

func (s *Server) notify(event string, lk link, token string) {
	if s.cfg.Webhook == nil {
		return
	}
	s.cfg.Webhook.Send(Event{
		Event: event, User: lk.login.User, ClientAddr: lk.login.Addr, Database: lk.login.Database,
		AppName: lk.login.AppName, ApprovalURL: s.url(token), Expires: lk.expires.UTC(),
	})
}

// newLink records a link for l and returns its token and a copy.
func (s *Server) newLink(l mfa.Login, waitID uint64) (string, link) {
	token := randomToken()
	now := s.cfg.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sweepLocked(now)
	// Bound what one user (whoever has the password) can make us keep:
	// the oldest links of the user go first.
	var mine []*link
	for _, lk := range s.links {
		if lk.login.User == l.User {
			mine = append(mine, lk)
		}
	}
	for len(mine) >= maxLinksPerUser || len(s.links) >= maxLinks {
		oldest := 0
		for i := range mine {
			if mine[i].id < mine[oldest].id {
				oldest = i
			}
		}
		if len(mine) == 0 {
			break
		}
		delete(s.links, mine[oldest].key)
		mine = append(mine[:oldest], mine[oldest+1:]...)
	}
	s.next++
	lk := &link{id: s.next, key: hash(token), login: l, since: now, expires: now.Add(s.cfg.LinkTTL), waitID: waitID}
	s.links[lk.key] = lk
	return token, *lk
}

// sweepLocked drops expired links, grants and sessions.
func (s *Server) sweepLocked(now time.Time) {
	for k, lk := range s.links {
		if !now.Before(lk.expires) {
			delete(s.links, k)
		}
	}
	for k, until := range s.grants {
		if !now.Before(until) {
			delete(s.grants, k)
		}
	}
	for k, se := range s.sessions {
		if !now.Before(se.expires) {
			delete(s.sessions, k)
		}
	}
}

// grantKey keys a grant on the user and the client's IP (a retry comes
// from another port).
func grantKey(user, addr string) string {
	ip := addr
	if ap, err := netip.ParseAddrPort(addr); err == nil {
		ip = ap.Addr().Unmap().String()
	} else if h, _, err := net.SplitHostPort(addr); err == nil {
		ip = h
	}
	return user + "\x00" + ip
}

// randomToken is 256 random bits, URL-safe.
func randomToken() string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic("web: no randomness: " + err.Error())
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// hash is how tokens are kept: a copy of the map cannot be replayed, and
// lookups compare digests, not the secret.
func hash(token string) string {
	h := sha256.Sum256([]byte(token))
	return string(h[:])
}
