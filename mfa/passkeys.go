package mfa

import (
	"errors"
	"time"
)

// Passkey is one WebAuthn credential (a passkey or a security key) a user
// registered on the approval page (loop/web) from an enrollment link made
// by `pgmfa enroll --webauthn USER`. It signs the user in on the page, in
// place of a TOTP code; the TOTP secret stays the user's enrollment.
type Passkey struct {
	// ID is the credential id the authenticator chose (1 to 1023 bytes);
	// unique across users.
	ID []byte
	// Data is the credential as the page serialises it (JSON of
	// webauthn.Credential: public key, AAGUID, flags, transports). A store
	// seals it at rest like a TOTP secret, with "passkey:"+user as the
	// associated data, so a sealed record moved to another user does not
	// open.
	Data []byte
	// SignCount is the authenticator's signature counter as last seen. It
	// lives outside Data so that a store can move it with a compare-and-set
	// (SetSignCount) without opening and resealing the record.
	SignCount uint32
	Created   time.Time
}

// PasskeyAD is the associated data a passkey of user is sealed with.
func PasskeyAD(user string) string { return "passkey:" + user }

// Errors of PasskeyStore, for errors.Is.
var (
	// ErrLinkInvalid: the enrollment link is unknown, used or expired.
	ErrLinkInvalid = errors.New("this enrollment link is not valid: it was used already or has expired; ask for a new one (pgmfa enroll --webauthn USER)")
	// ErrPasskeyExists: a passkey with that credential id is stored already.
	ErrPasskeyExists = errors.New("this passkey is registered already")
)

// MaxPasskeysPerUser bounds how many passkeys one user may register.
const MaxPasskeysPerUser = 16

// PasskeyStore is implemented by stores that keep passkeys and their
// enrollment links: FileStore and mfa/pgstore's Store. Every method reads
// the store itself, not a copy cached at start: a link made by `pgmfa
// enroll --webauthn` in another process is valid at once, without SIGHUP.
// The page calls these from HTTP handlers, never from an event loop.
type PasskeyStore interface {
	// UserPasskeys returns user's passkeys, opened, oldest first.
	UserPasskeys(user string) ([]Passkey, error)
	// PasskeyByID returns the passkey with credential id and its user.
	PasskeyByID(id []byte) (user string, p Passkey, ok bool, err error)
	// AddPasskeyLink records an enrollment link for user: the SHA-256 of
	// its token (the token itself is never stored), usable until expires.
	// ErrNotEnrolled if user has no TOTP enrollment.
	AddPasskeyLink(user string, tokenHash []byte, expires time.Time) error
	// PasskeyLink returns the user of an unused link that is valid at now
	// (the page's look before the ceremony; it does not use the link).
	PasskeyLink(tokenHash []byte, now time.Time) (user string, ok bool, err error)
	// EnrollPasskey uses the link and stores p for the link's user in one
	// atomic step, across processes: of two uses of one link, one gets
	// ErrLinkInvalid. ErrPasskeyExists if p.ID is stored already (the link
	// stays unused then); an error, the link unused, when the user has
	// MaxPasskeysPerUser passkeys.
	EnrollPasskey(tokenHash []byte, now time.Time, p Passkey) (user string, err error)
	// SetSignCount moves id's counter from old to new if it is still old
	// and reports whether it did (false: another sign-in with the same
	// passkey got there first, or the passkey was removed).
	SetSignCount(id []byte, old, new uint32) (bool, error)
	// RemovePasskeys removes user's passkeys and open enrollment links and
	// returns how many passkeys it removed.
	RemovePasskeys(user string) (int, error)
}
