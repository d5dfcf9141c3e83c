package web

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/go-webauthn/webauthn/protocol"
	"github.com/go-webauthn/webauthn/webauthn"

	"github.com/pgmfa/pgmfa/mfa"
)

// Passkeys (WebAuthn) on the page, with github.com/go-webauthn/webauthn.
//
// Enrollment: `pgmfa enroll --webauthn USER` stores the SHA-256 of a
// random token with an expiry (mfa.PasskeyStore) and prints URL/enroll/TOKEN.
// The page registers a passkey from that link and, in the same store
// transaction, uses the link up (EnrollPasskey): a link registers one
// passkey, once.
//
// Sign-in: from a login's link the page knows the user and asks for one of
// the user's passkeys (allowCredentials); from the start page it asks for
// any passkey of this site (a discoverable credential) and learns the user
// from the credential id, so the start page never says which user names
// exist. Registration requires a resident key (a passkey) and every
// ceremony requires user verification (a PIN or a biometric on the
// authenticator): a passkey is then two factors on its own, and the page
// accepts it in place of a TOTP code.
//
// Replay: a ceremony's challenge lives in this process, bound to a cookie,
// and is taken (deleted) by the first finish that presents it, so a
// captured assertion is refused the second time. The signature counter
// moves with a compare-and-set in the store (SetSignCount); a counter that
// goes backwards (a cloned authenticator, per the WebAuthn spec §6.1.1)
// refuses the sign-in.

// maxJSONBody bounds a ceremony's JSON: an attestation with a certificate
// chain is a few KiB.
const maxJSONBody = 64 << 10

// ceremonyTTL: how long a started registration or sign-in may take (the
// browser's own timeout is the same).
const ceremonyTTL = 2 * time.Minute

const ceremonyCookie = "pgmfa_webauthn"

// maxCeremonies bounds the ceremonies this process keeps at once.
const maxCeremonies = 10000

// ceremony is a started registration or sign-in.
type ceremony struct {
	register  bool
	data      webauthn.SessionData
	tokenHash []byte // a registration: its enrollment link (mfa.PasskeyLinkHash)
	token     string // sign-in from a login's link: the link's token, used up on success
	user      string // "" for a discoverable sign-in
	expires   time.Time
}

// newRelyingParty returns the WebAuthn relying party of the page at base
// (its origin, with the host as the RP ID), or why it cannot be one:
// WebAuthn accepts only a domain as the RP ID, never an IP address.
func newRelyingParty(base string) (*webauthn.WebAuthn, error) {
	u, err := url.Parse(base)
	if err != nil {
		return nil, err
	}
	host := u.Hostname()
	if net.ParseIP(host) != nil {
		return nil, fmt.Errorf("--web-url %s names an IP address; WebAuthn needs a domain name (for example localhost, or the host's DNS name)", base)
	}
	return webauthn.New(&webauthn.Config{
		RPID:          host,
		RPDisplayName: "pgmfa",
		RPOrigins:     []string{u.Scheme + "://" + u.Host},
		Timeouts: webauthn.TimeoutsConfig{
			Login:        webauthn.TimeoutConfig{Enforce: true, Timeout: ceremonyTTL, TimeoutUVD: ceremonyTTL},
			Registration: webauthn.TimeoutConfig{Enforce: true, Timeout: ceremonyTTL, TimeoutUVD: ceremonyTTL},
		},
	})
}

// rpUser is a database user as WebAuthn sees it.
type rpUser struct {
	name  string
	creds []webauthn.Credential
}

// userHandle is the WebAuthn user id of a database user: a digest, so the
// authenticator and anything reading it learn no name (the spec asks for
// a handle that carries no personal data), yet stable, so no store column
// maps handles to users.
func userHandle(user string) []byte {
	h := sha256.Sum256([]byte("pgmfa webauthn user handle\x00" + user))
	return h[:]
}

func (u *rpUser) WebAuthnID() []byte                         { return userHandle(u.name) }
func (u *rpUser) WebAuthnName() string                       { return u.name }
func (u *rpUser) WebAuthnDisplayName() string                { return u.name }
func (u *rpUser) WebAuthnCredentials() []webauthn.Credential { return u.creds }

// loadUser returns user with their passkeys from the store.
func (s *Server) loadUser(user string) (*rpUser, error) {
	pks, err := s.cfg.Passkeys.UserPasskeys(user)
	if err != nil {
		return nil, err
	}
	u := &rpUser{name: user}
	for _, p := range pks {
		c, err := credentialOf(p)
		if err != nil {
			return nil, err
		}
		u.creds = append(u.creds, c)
	}
	return u, nil
}

// credentialOf opens a stored passkey: the record, with the counter the
// store keeps beside it.
func credentialOf(p mfa.Passkey) (webauthn.Credential, error) {
	var c webauthn.Credential
	if err := json.Unmarshal(p.Data, &c); err != nil {
		return c, fmt.Errorf("a stored passkey does not decode: %w", err)
	}
	c.Authenticator.SignCount = p.SignCount
	return c, nil
}

// jsonError answers a ceremony request with a message the page shows.
func jsonError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

func jsonOK(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// ceremonyRequest checks what a ceremony request must carry and returns
// its body: passkeys on; JSON (which a form on another site cannot send
// without a CORS preflight this page never answers); the sign-in CSRF
// token in X-CSRF-Token (double submit, as the forms); when the browser
// says where it comes from, this page's origin; a body within
// maxJSONBody. It answers a refusal itself.
func (s *Server) ceremonyRequest(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	if s.rp == nil {
		s.noPasskeys(w, r)
		return nil, false
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		jsonError(w, http.StatusUnsupportedMediaType, "send application/json")
		return nil, false
	}
	if o := r.Header.Get("Origin"); o != "" && o != s.origin() {
		jsonError(w, http.StatusForbidden, "wrong origin")
		return nil, false
	}
	pre, err := r.Cookie(s.cookieName(preCookie))
	if err != nil || !same(r.Header.Get("X-CSRF-Token"), pre.Value) {
		jsonError(w, http.StatusForbidden, "missing or wrong CSRF token; reload the page and try again")
		return nil, false
	}
	b, err := io.ReadAll(r.Body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			jsonError(w, http.StatusRequestEntityTooLarge, "request body too large")
		} else {
			jsonError(w, http.StatusBadRequest, "could not read the request")
		}
		return nil, false
	}
	return b, true
}

func (s *Server) origin() string {
	u, err := url.Parse(s.cfg.URL)
	if err != nil {
		return ""
	}
	return u.Scheme + "://" + u.Host
}

// putCeremony keeps c under a new id in a cookie.
func (s *Server) putCeremony(w http.ResponseWriter, c *ceremony) bool {
	id := randomToken()
	now := s.cfg.Now()
	c.expires = now.Add(ceremonyTTL)
	s.mu.Lock()
	for k, old := range s.ceremonies {
		if !now.Before(old.expires) {
			delete(s.ceremonies, k)
		}
	}
	if len(s.ceremonies) >= maxCeremonies {
		s.mu.Unlock()
		jsonError(w, http.StatusServiceUnavailable, "too many sign-ins in progress; try again in a minute")
		return false
	}
	s.ceremonies[hash(id)] = c
	s.mu.Unlock()
	s.setCookie(w, ceremonyCookie, id, ceremonyTTL)
	return true
}

// takeCeremony removes and returns the request's ceremony: a finish is
// answered once, so a replayed response finds nothing.
func (s *Server) takeCeremony(r *http.Request) *ceremony {
	c, err := r.Cookie(s.cookieName(ceremonyCookie))
	if err != nil {
		return nil
	}
	key := hash(c.Value)
	s.mu.Lock()
	defer s.mu.Unlock()
	cer, ok := s.ceremonies[key]
	delete(s.ceremonies, key)
	if !ok || !s.cfg.Now().Before(cer.expires) {
		return nil
	}
	return cer
}

// enrollPage: the page of an enrollment link.
func (s *Server) enrollPage(w http.ResponseWriter, r *http.Request) {
	user, ok := s.enrollLink(w, r)
	if !ok {
		return
	}
	s.render(w, pageData{Title: "Register a passkey", Enroll: true, FixedUser: user, CSRF: s.preToken(w, r), Passkeys: true})
}

// enrollLink looks the request's enrollment link up, answering an invalid
// one itself.
func (s *Server) enrollLink(w http.ResponseWriter, r *http.Request) (string, bool) {
	if s.rp == nil {
		s.noPasskeys(w, r)
		return "", false
	}
	th := mfa.PasskeyLinkHash(r.PathValue("token"))
	user, ok, err := s.cfg.Passkeys.PasskeyLink(th, s.cfg.Now())
	switch {
	case err != nil:
		s.log.Error("approval page: the store did not answer an enrollment link", "err", err)
		s.fail(w, r, http.StatusServiceUnavailable, "The secret store did not answer; try again in a minute.")
		return "", false
	case !ok:
		s.fail(w, r, http.StatusGone, mfa.ErrLinkInvalid.Error())
		return "", false
	}
	return user, true
}

// fail answers a page or a ceremony request with an error.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, status int, msg string) {
	if r.Method == http.MethodPost {
		jsonError(w, status, msg)
		return
	}
	s.render(w, pageData{Status: status, Title: "Link not valid", Error: msg})
}

func (s *Server) noPasskeys(w http.ResponseWriter, r *http.Request) {
	s.fail(w, r, http.StatusNotFound, "Passkeys are not enabled on this page (the store keeps no passkeys, or --web-url names an IP address).")
}

// enrollBegin starts registering a passkey from an enrollment link.
func (s *Server) enrollBegin(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.ceremonyRequest(w, r); !ok {
		return
	}
	user, ok := s.enrollLink(w, r)
	if !ok {
		return
	}
	u, err := s.loadUser(user)
	if err != nil {
		s.log.Error("approval page: loading passkeys", "user", user, "err", err)
		jsonError(w, http.StatusServiceUnavailable, "the secret store did not answer; try again in a minute")
		return
	}
	if len(u.creds) >= mfa.MaxPasskeysPerUser {
		jsonError(w, http.StatusConflict, fmt.Sprintf("user %q has %d passkeys, the most one user may have; remove them with pgmfa enroll --remove --webauthn", user, len(u.creds)))
		return
	}
	creation, data, err := s.rp.BeginRegistration(u,
		webauthn.WithAuthenticatorSelection(protocol.AuthenticatorSelection{
			ResidentKey: protocol.ResidentKeyRequirementRequired, RequireResidentKey: protocol.ResidentKeyRequired(),
			UserVerification: protocol.VerificationRequired,
		}),
		webauthn.WithConveyancePreference(protocol.PreferNoAttestation),
		webauthn.WithExclusions(webauthn.Credentials(u.creds).CredentialDescriptors()))
	if err != nil {
		jsonError(w, http.StatusInternalServerError, "could not start the registration")
		return
	}
	if !s.putCeremony(w, &ceremony{register: true, data: *data, tokenHash: mfa.PasskeyLinkHash(r.PathValue("token")), user: user}) {
		return
	}
	jsonOK(w, creation)
}

// enrollFinish checks the new passkey and stores it, using the link up.
func (s *Server) enrollFinish(w http.ResponseWriter, r *http.Request) {
	body, ok := s.ceremonyRequest(w, r)
	if !ok {
		return
	}
	c := s.takeCeremony(r)
	th := mfa.PasskeyLinkHash(r.PathValue("token"))
	if c == nil || !c.register || !bytes.Equal(c.tokenHash, th) {
		jsonError(w, http.StatusBadRequest, "no passkey registration is in progress here (it finished, or took longer than "+ceremonyTTL.String()+"): reload the page and start again")
		return
	}
	parsed, err := protocol.ParseCredentialCreationResponseBytes(body)
	if err != nil {
		jsonError(w, http.StatusBadRequest, "the browser's answer does not parse: "+protocolDetail(err))
		return
	}
	u, err := s.loadUser(c.user)
	if err != nil {
		jsonError(w, http.StatusServiceUnavailable, "the secret store did not answer; try again in a minute")
		return
	}
	cred, err := s.rp.CreateCredential(u, c.data, parsed)
	if err != nil {
		s.log.Warn("passkey registration refused", "user", c.user, "web_client", r.RemoteAddr, "err", protocolDetail(err))
		jsonError(w, http.StatusBadRequest, "the passkey was not accepted: "+protocolDetail(err))
		return
	}
	data, err := json.Marshal(cred)
	if err != nil {
		jsonError(w, http.StatusInternalServerError, "could not record the passkey")
		return
	}
	user, err := s.cfg.Passkeys.EnrollPasskey(th, s.cfg.Now(), mfa.Passkey{ID: cred.ID, Data: data, SignCount: cred.Authenticator.SignCount, Created: s.cfg.Now()})
	switch {
	case errors.Is(err, mfa.ErrLinkInvalid):
		jsonError(w, http.StatusGone, err.Error())
		return
	case errors.Is(err, mfa.ErrPasskeyExists):
		jsonError(w, http.StatusConflict, err.Error())
		return
	case err != nil:
		s.log.Error("approval page: storing a passkey", "user", c.user, "err", err)
		jsonError(w, http.StatusServiceUnavailable, "the passkey could not be stored: "+err.Error())
		return
	}
	s.log.Info("passkey registered on the approval page", "user", user, "web_client", r.RemoteAddr, "credential", shortID(cred.ID))
	jsonOK(w, map[string]any{"ok": true, "message": fmt.Sprintf("Passkey registered for user %q. Sign in with it on the approval page when a login needs your approval.", user)})
}

// passkeyRequest is the body of /passkey/begin.
type passkeyRequest struct {
	Token string `json:"token"` // a login's link token, or "" on the start page
}

// passkeyBegin starts a sign-in with a passkey.
func (s *Server) passkeyBegin(w http.ResponseWriter, r *http.Request) {
	body, ok := s.ceremonyRequest(w, r)
	if !ok {
		return
	}
	var req passkeyRequest
	if err := json.Unmarshal(body, &req); err != nil {
		jsonError(w, http.StatusBadRequest, "bad request")
		return
	}
	opts := []webauthn.LoginOption{webauthn.WithUserVerification(protocol.VerificationRequired)}
	if req.Token == "" {
		assertion, data, err := s.rp.BeginDiscoverableLogin(opts...)
		if err != nil {
			jsonError(w, http.StatusInternalServerError, "could not start the sign-in")
			return
		}
		if s.putCeremony(w, &ceremony{data: *data}) {
			jsonOK(w, assertion)
		}
		return
	}
	lk, ok := s.openLink(req.Token)
	if !ok {
		jsonError(w, http.StatusGone, "This link was already used or has expired. Connect again to get a new one, or sign in on the start page.")
		return
	}
	u, err := s.loadUser(lk.login.User)
	if err != nil {
		jsonError(w, http.StatusServiceUnavailable, "the secret store did not answer; try again in a minute")
		return
	}
	if len(u.creds) == 0 {
		jsonError(w, http.StatusBadRequest, fmt.Sprintf("user %q has no passkey: sign in with the code from your authenticator app", u.name))
		return
	}
	assertion, data, err := s.rp.BeginLogin(u, opts...)
	if err != nil {
		jsonError(w, http.StatusInternalServerError, "could not start the sign-in")
		return
	}
	if s.putCeremony(w, &ceremony{data: *data, user: u.name, token: req.Token}) {
		jsonOK(w, assertion)
	}
}

// passkeyFinish checks an assertion and signs its user in.
func (s *Server) passkeyFinish(w http.ResponseWriter, r *http.Request) {
	body, ok := s.ceremonyRequest(w, r)
	if !ok {
		return
	}
	c := s.takeCeremony(r)
	if c == nil || c.register {
		s.countSignIn(MethodPasskey, false)
		s.log.Warn("passkey sign-in refused: no sign-in in progress (replayed, or too late)", "web_client", r.RemoteAddr)
		jsonError(w, http.StatusBadRequest, "no passkey sign-in is in progress here (this answer was used already, or took longer than "+ceremonyTTL.String()+"): start again")
		return
	}
	parsed, err := protocol.ParseCredentialRequestResponseBytes(body)
	if err != nil {
		jsonError(w, http.StatusBadRequest, "the browser's answer does not parse: "+protocolDetail(err))
		return
	}
	var user *rpUser
	var cred *webauthn.Credential
	if c.user != "" {
		if user, err = s.loadUser(c.user); err == nil {
			cred, err = s.rp.ValidateLogin(user, c.data, parsed)
		}
	} else {
		var found webauthn.User
		found, cred, err = s.rp.ValidatePasskeyLogin(func(rawID, handle []byte) (webauthn.User, error) {
			name, _, ok, err := s.cfg.Passkeys.PasskeyByID(rawID)
			if err != nil {
				return nil, err
			}
			if !ok {
				return nil, errors.New("no such passkey")
			}
			return s.loadUser(name)
		}, c.data, parsed)
		if err == nil {
			user = found.(*rpUser)
		}
	}
	if err != nil {
		s.countSignIn(MethodPasskey, false)
		s.log.Warn("passkey sign-in refused", "user", c.user, "web_client", r.RemoteAddr, "err", protocolDetail(err))
		jsonError(w, http.StatusUnauthorized, "the passkey was not accepted: "+protocolDetail(err))
		return
	}
	if cred.Authenticator.CloneWarning {
		s.countSignIn(MethodPasskey, false)
		s.log.Warn("passkey sign-in refused: its signature counter went backwards (a cloned authenticator?)", "user", user.name,
			"web_client", r.RemoteAddr, "credential", shortID(cred.ID))
		jsonError(w, http.StatusUnauthorized, "the passkey was not accepted: its signature counter went backwards, which a copied authenticator does; use another passkey or your code, and tell your administrator")
		return
	}
	var old uint32
	for _, k := range user.creds {
		if bytes.Equal(k.ID, cred.ID) {
			old = k.Authenticator.SignCount
		}
	}
	if cred.Authenticator.SignCount != old {
		moved, err := s.cfg.Passkeys.SetSignCount(cred.ID, old, cred.Authenticator.SignCount)
		if err != nil {
			jsonError(w, http.StatusServiceUnavailable, "the secret store did not answer; try again in a minute")
			return
		}
		if !moved {
			jsonError(w, http.StatusUnauthorized, "this passkey was used for another sign-in at the same moment; start again")
			return
		}
	}
	if !s.startSession(w, r, user.name, c.token, MethodPasskey) {
		return
	}
	jsonOK(w, map[string]any{"ok": true, "redirect": "/"})
}

// protocolDetail is what a go-webauthn error says, for the person at the
// page and the log.
func protocolDetail(err error) string {
	var pe *protocol.Error
	if errors.As(err, &pe) && pe.Details != "" {
		return pe.Details
	}
	return err.Error()
}

// shortID names a credential in the log without writing it out whole.
func shortID(id []byte) string {
	h := sha256.Sum256(id)
	return fmt.Sprintf("%x", h[:6])
}
