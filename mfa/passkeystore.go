package mfa

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"time"
)

// FileStore keeps passkeys and their enrollment links in the store file,
// beside the users they belong to. Unlike the TOTP secrets, which the
// proxy caches from start to SIGHUP, every PasskeyStore method reads the
// file itself: a link written by `pgmfa enroll --webauthn` in another
// process is valid at once. Writes take the store's flock and re-read the
// file (updateContent), so using a link and moving a sign count are atomic
// across every process sharing the file.
//
// On disk a passkey's Data is sealed like a TOTP secret (SealPasskeyData);
// without a key it is written in base64 and counted by Plaintext. A link is kept as the
// hex SHA-256 of its token. A used link is deleted in the same write that
// stores its passkey, and an expired one at the next write: a link that is
// not in the file is exactly as invalid as a used one.

// MaxPasskeyIDLen bounds a credential id: WebAuthn allows at most 1023
// bytes.
const MaxPasskeyIDLen = 1023

// Check rejects a passkey no store keeps: an empty or oversize credential
// id, or no credential data.
func (p Passkey) Check() error {
	if len(p.ID) == 0 || len(p.ID) > MaxPasskeyIDLen {
		return fmt.Errorf("passkey credential id is %d bytes; it must be 1 to %d", len(p.ID), MaxPasskeyIDLen)
	}
	if len(p.Data) == 0 {
		return errors.New("passkey has no credential data")
	}
	return nil
}

// SealPasskeyData is how every store keeps a passkey's Data at rest:
// sealed with keys under PasskeyAD(user), or without keys in base64 (never
// the raw bytes, so that no Data can pass for a sealed value).
func SealPasskeyData(keys *Keyring, user string, data []byte) (string, error) {
	if keys == nil {
		return base64.StdEncoding.EncodeToString(data), nil
	}
	sealed, err := keys.Seal(PasskeyAD(user), string(data))
	if err != nil {
		return "", fmt.Errorf("encrypt a passkey of %q: %w", user, err)
	}
	return sealed, nil
}

// OpenPasskeyData is the reverse of SealPasskeyData; plaintext reports a
// value that was not sealed.
func OpenPasskeyData(keys *Keyring, user, stored string) (data []byte, plaintext bool, err error) {
	if !Sealed(stored) {
		data, err := base64.StdEncoding.DecodeString(stored)
		if err != nil {
			return nil, true, fmt.Errorf("passkey data is neither encrypted nor base64: %w", err)
		}
		return data, true, nil
	}
	d, err := keys.Open(PasskeyAD(user), stored)
	if err != nil {
		return nil, false, err
	}
	return []byte(d), false, nil
}

// storedPasskey is a passkey on disk.
type storedPasskey struct {
	User      string    `json:"user"`
	ID        string    `json:"id"`   // base64url, unpadded (as WebAuthn writes credential ids)
	Data      string    `json:"data"` // sealed, or base64 without a key
	SignCount uint32    `json:"sign_count"`
	Created   time.Time `json:"created,omitzero"`
}

// storedLink is an open enrollment link on disk.
type storedLink struct {
	TokenSHA256 string    `json:"token_sha256"` // hex; the token itself is never stored
	User        string    `json:"user"`
	Expires     time.Time `json:"expires"`
}

// heldPasskey is a passkey, opened, with its user.
type heldPasskey struct {
	user string
	Passkey
}

// passkeySet is the passkeys part of a store, opened.
type passkeySet struct {
	byID  map[string]heldPasskey // by string(credential id)
	links map[string]storedLink  // by TokenSHA256
}

func newPasskeySet() passkeySet {
	return passkeySet{byID: map[string]heldPasskey{}, links: map[string]storedLink{}}
}

// openPasskeys opens and checks the passkeys and links of a decoded store
// file whose users are already checked. plain counts the passkeys read
// unsealed.
func openPasskeys(doc storeFile, keys *Keyring) (set passkeySet, plain int, err error) {
	set = newPasskeySet()
	for i, sp := range doc.Passkeys {
		if _, ok := doc.Users[sp.User]; !ok {
			return set, 0, fmt.Errorf("passkey %d: user %q is not enrolled", i+1, sp.User)
		}
		id, err := base64.RawURLEncoding.DecodeString(sp.ID)
		if err != nil {
			return set, 0, fmt.Errorf("passkey %d of user %q: credential id is not unpadded base64url: %w", i+1, sp.User, err)
		}
		data, isPlain, err := OpenPasskeyData(keys, sp.User, sp.Data)
		if err != nil {
			return set, 0, fmt.Errorf("passkey %d of user %q: %w", i+1, sp.User, err)
		}
		if isPlain {
			plain++
		}
		p := Passkey{ID: id, Data: data, SignCount: sp.SignCount, Created: sp.Created}
		if err := p.Check(); err != nil {
			return set, 0, fmt.Errorf("passkey %d of user %q: %w", i+1, sp.User, err)
		}
		if _, dup := set.byID[string(id)]; dup {
			return set, 0, fmt.Errorf("passkey %d of user %q: credential id %s is stored twice", i+1, sp.User, sp.ID)
		}
		set.byID[string(id)] = heldPasskey{user: sp.User, Passkey: p}
	}
	for i, l := range doc.PasskeyLinks {
		if _, ok := doc.Users[l.User]; !ok {
			return set, 0, fmt.Errorf("passkey enrollment link %d: user %q is not enrolled", i+1, l.User)
		}
		if h, err := hex.DecodeString(l.TokenSHA256); err != nil || len(h) != 32 || hex.EncodeToString(h) != l.TokenSHA256 {
			return set, 0, fmt.Errorf("passkey enrollment link %d of user %q: token_sha256 is not 64 lower-case hex digits", i+1, l.User)
		}
		if _, dup := set.links[l.TokenSHA256]; dup {
			return set, 0, fmt.Errorf("passkey enrollment link %d of user %q: stored twice", i+1, l.User)
		}
		set.links[l.TokenSHA256] = l
	}
	return set, plain, nil
}

// sealPasskeys puts set into doc, the data sealed with keys, in a stable
// order (by user, then age) so that a rewrite of unchanged content writes
// the same file.
func sealPasskeys(doc *storeFile, set passkeySet, keys *Keyring) error {
	for _, h := range set.sorted() {
		data, err := SealPasskeyData(keys, h.user, h.Data)
		if err != nil {
			return fmt.Errorf("TOTP store: %w", err)
		}
		doc.Passkeys = append(doc.Passkeys, storedPasskey{
			User: h.user, ID: base64.RawURLEncoding.EncodeToString(h.ID),
			Data: data, SignCount: h.SignCount, Created: h.Created,
		})
	}
	for _, l := range set.links {
		doc.PasskeyLinks = append(doc.PasskeyLinks, l)
	}
	sort.Slice(doc.PasskeyLinks, func(i, j int) bool { return doc.PasskeyLinks[i].TokenSHA256 < doc.PasskeyLinks[j].TokenSHA256 })
	return nil
}

// sorted returns the passkeys by user, then oldest first.
func (set passkeySet) sorted() []heldPasskey {
	out := make([]heldPasskey, 0, len(set.byID))
	for _, h := range set.byID {
		out = append(out, h)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.user != b.user {
			return a.user < b.user
		}
		if !a.Created.Equal(b.Created) {
			return a.Created.Before(b.Created)
		}
		return bytes.Compare(a.ID, b.ID) < 0
	})
	return out
}

// removeUser drops user's passkeys and links and returns how many
// passkeys it dropped.
func (set passkeySet) removeUser(user string) int {
	n := 0
	for id, h := range set.byID {
		if h.user == user {
			delete(set.byID, id)
			n++
		}
	}
	for k, l := range set.links {
		if l.User == user {
			delete(set.links, k)
		}
	}
	return n
}

// pruneLinks drops the links expired at now.
func (set passkeySet) pruneLinks(now time.Time) {
	for k, l := range set.links {
		if !now.Before(l.Expires) {
			delete(set.links, k)
		}
	}
}

// validLink is the link of tokenHash if it is valid at now.
func (set passkeySet) validLink(tokenHash []byte, now time.Time) (storedLink, bool) {
	l, ok := set.links[hex.EncodeToString(tokenHash)]
	if !ok || !now.Before(l.Expires) {
		return storedLink{}, false
	}
	return l, true
}

// readPasskeys reads the file as it is now (no lock: a write replaces the
// file with a rename, so a read sees one whole version).
func (s *FileStore) readPasskeys() (passkeySet, error) {
	c, err := readStoreAll(s.path, s.keys.Load())
	return c.passkeys, err
}

// UserPasskeys implements PasskeyStore.
func (s *FileStore) UserPasskeys(user string) ([]Passkey, error) {
	set, err := s.readPasskeys()
	if err != nil {
		return nil, err
	}
	var out []Passkey
	for _, h := range set.sorted() {
		if h.user == user {
			out = append(out, h.Passkey)
		}
	}
	return out, nil
}

// PasskeyByID implements PasskeyStore.
func (s *FileStore) PasskeyByID(id []byte) (string, Passkey, bool, error) {
	set, err := s.readPasskeys()
	if err != nil {
		return "", Passkey{}, false, err
	}
	h, ok := set.byID[string(id)]
	return h.user, h.Passkey, ok, nil
}

// AddPasskeyLink implements PasskeyStore.
func (s *FileStore) AddPasskeyLink(user string, tokenHash []byte, expires time.Time) error {
	if len(tokenHash) != 32 {
		return fmt.Errorf("an enrollment link's token hash is a SHA-256 (32 bytes), got %d bytes", len(tokenHash))
	}
	return s.updateContent(func(c *storeContent) error {
		if _, ok := c.users[user]; !ok {
			return fmt.Errorf("user %q: %w", user, ErrNotEnrolled)
		}
		h := hex.EncodeToString(tokenHash)
		c.passkeys.links[h] = storedLink{TokenSHA256: h, User: user, Expires: expires.UTC()}
		return nil
	})
}

// PasskeyLink implements PasskeyStore.
func (s *FileStore) PasskeyLink(tokenHash []byte, now time.Time) (string, bool, error) {
	set, err := s.readPasskeys()
	if err != nil {
		return "", false, err
	}
	l, ok := set.validLink(tokenHash, now)
	return l.User, ok, nil
}

// EnrollPasskey implements PasskeyStore: under the flock it re-reads the
// file, checks the link and the passkey, deletes the link and adds the
// passkey in one write. A zero p.Created is set to now.
func (s *FileStore) EnrollPasskey(tokenHash []byte, now time.Time, p Passkey) (string, error) {
	if err := p.Check(); err != nil {
		return "", err
	}
	if p.Created.IsZero() {
		p.Created = now
	}
	p.Created = p.Created.UTC()
	var user string
	err := s.updateContent(func(c *storeContent) error {
		l, ok := c.passkeys.validLink(tokenHash, now)
		if !ok {
			return ErrLinkInvalid
		}
		if _, dup := c.passkeys.byID[string(p.ID)]; dup {
			return ErrPasskeyExists
		}
		if n := c.passkeys.count(l.User); n >= MaxPasskeysPerUser {
			return fmt.Errorf("user %q has %d passkeys, the most one user may register; remove them with pgmfa enroll --remove --webauthn %s", l.User, n, l.User)
		}
		delete(c.passkeys.links, l.TokenSHA256)
		c.passkeys.byID[string(p.ID)] = heldPasskey{user: l.User, Passkey: p}
		user = l.User
		return nil
	})
	if err != nil {
		return "", err
	}
	return user, nil
}

// count is how many passkeys user has.
func (set passkeySet) count(user string) int {
	n := 0
	for _, h := range set.byID {
		if h.user == user {
			n++
		}
	}
	return n
}

// SetSignCount implements PasskeyStore: a compare-and-set under the flock
// on the file's current content.
func (s *FileStore) SetSignCount(id []byte, old, new uint32) (bool, error) {
	var set bool
	err := s.updateContent(func(c *storeContent) error {
		h, ok := c.passkeys.byID[string(id)]
		if !ok || h.SignCount != old {
			return errUnchanged
		}
		h.SignCount = new
		c.passkeys.byID[string(id)] = h
		set = true
		return nil
	})
	return set, err
}

// RemovePasskeys implements PasskeyStore. A user with no passkeys and no
// links (or not enrolled at all) removes nothing and writes nothing.
func (s *FileStore) RemovePasskeys(user string) (int, error) {
	var n int
	err := s.updateContent(func(c *storeContent) error {
		links := len(c.passkeys.links)
		n = c.passkeys.removeUser(user)
		if n == 0 && len(c.passkeys.links) == links {
			return errUnchanged
		}
		return nil
	})
	return n, err
}

var _ PasskeyStore = (*FileStore)(nil)

// NewPasskeyLinkToken returns a fresh enrollment link token (256 random
// bits, base64url: it goes into the link's URL) and its PasskeyLinkHash,
// which is all a store keeps of it.
func NewPasskeyLinkToken() (token string, hash []byte, err error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", nil, err
	}
	token = base64.RawURLEncoding.EncodeToString(b)
	return token, PasskeyLinkHash(token), nil
}

// PasskeyLinkHash is the SHA-256 of a link's token as the URL carries it:
// what `pgmfa enroll --webauthn` stores and what the page looks the link up
// by, so a copy of the store cannot be turned back into a usable link.
func PasskeyLinkHash(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}

// AllPasskeys returns every user's passkeys, opened, as the file holds them
// now (`pgmfa store migrate`). Open enrollment links are not included: they
// are short-lived, and new ones are made on the new store.
func (s *FileStore) AllPasskeys() (map[string][]Passkey, error) {
	set, err := s.readPasskeys()
	if err != nil {
		return nil, err
	}
	out := map[string][]Passkey{}
	for _, h := range set.sorted() {
		out[h.user] = append(out[h.user], h.Passkey)
	}
	return out, nil
}
