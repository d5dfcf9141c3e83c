package mfa

import (
	"encoding/base32"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
)

// Errors of FileStore.Enroll and FileStore.Remove, for errors.Is.
var (
	ErrAlreadyEnrolled = errors.New("already enrolled; use --force to rotate the secret")
	ErrNotEnrolled     = errors.New("not enrolled")
	// ErrSecretChanged: ClaimStep found another secret in the file than the
	// one the code was checked against (the user was re-enrolled).
	ErrSecretChanged = errors.New("the secret was changed (re-enrolled) since it was loaded")
)

// FileStore keeps per-user secrets and their TOTP parameters in a JSON file.
// Loading refuses a file that group or others can read or write; writes are
// atomic with mode 0600. It implements Secrets, Accounts, StepClaimer and
// PasskeyStore (passkeystore.go) and is safe for concurrent use.
//
// Every write — `pgmfa enroll`, and the proxy claiming a code's time step
// (ClaimStep) — takes an flock on the store's directory and re-reads the
// file first, so concurrent writers, in one process or several, neither lose
// each other's changes nor accept one code twice. The directory is locked,
// not the file: a write replaces the file (rename), so a lock on the file
// would be on an inode the next writer no longer opens.
type FileStore struct {
	path string
	keys atomic.Pointer[Keyring] // nil: secrets are written in plaintext

	mu    sync.RWMutex // guards users, accts and plain; never held across file I/O
	users map[string]storedUser
	accts accountSet
	plain int
}

// OpenFileStore loads the store at path. A missing file is an empty store;
// it is created by the first Enroll.
func OpenFileStore(path string) (*FileStore, error) {
	return OpenFileStoreKeyed(path, nil)
}

// OpenFileStoreKeyed loads the store at path with keys to open sealed
// secrets and to seal every secret it writes (nil: plaintext, and a store
// holding sealed secrets is refused with ErrNoKey).
func OpenFileStoreKeyed(path string, keys *Keyring) (*FileStore, error) {
	c, err := readStoreAll(path, keys)
	if err != nil {
		return nil, err
	}
	s := &FileStore{path: path, users: c.users, accts: c.accts, plain: c.plain}
	s.keys.Store(keys)
	return s, nil
}

// SetKeys replaces the keyring (SIGHUP); the next Reload or write uses it.
func (s *FileStore) SetKeys(keys *Keyring) { s.keys.Store(keys) }

// Plaintext is how many secrets the file held unencrypted when it was last
// read (a store written before encryption, or without a key): TOTP secrets
// and passkey records.
func (s *FileStore) Plaintext() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.plain
}

// Reseal rewrites the file with every secret sealed under the current key
// of the store's keyring (`pgmfa store rotate-key`, and encrypting a store
// written before encryption); the accounts and passkeys are resealed with
// them. It returns how many TOTP secrets it wrote.
func (s *FileStore) Reseal() (int, error) {
	if s.keys.Load() == nil {
		return 0, ErrNoKey
	}
	var n int
	err := s.update(func(users map[string]storedUser) error {
		n = len(users)
		return nil
	})
	return n, err
}

// Path is the file the store lives in.
func (s *FileStore) Path() string { return s.path }

// Reload re-reads the file (SIGHUP). On error the old content stays in use.
// A file that was deleted reloads as empty: removing the store removes
// everyone's access, which is the safe reading of that action.
func (s *FileStore) Reload() error {
	c, err := readStoreAll(s.path, s.keys.Load())
	if err != nil {
		return err
	}
	s.adopt(c)
	return nil
}

// Secret implements Secrets.
func (s *FileStore) Secret(user string) (string, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	u, ok := s.users[user]
	return u.Secret, ok
}

// Account implements Accounts: the secret with the parameters it was
// enrolled with.
func (s *FileStore) Account(user string) (Account, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	u, ok := s.users[user]
	if !ok {
		return Account{}, false
	}
	return u.account(), true
}

// Users returns the enrolled users, sorted.
func (s *FileStore) Users() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]string, 0, len(s.users))
	for u := range s.users {
		out = append(out, u)
	}
	sort.Strings(out)
	return out
}

// Code returns user's code at t, computed from the store (`pgmfa code`,
// demos and tests; an authenticator app shows the same).
func (s *FileStore) Code(user string, t time.Time) (string, error) {
	acct, ok := s.Account(user)
	if !ok {
		return "", fmt.Errorf("user %q: %w", user, ErrNotEnrolled)
	}
	return accountCode(acct, Options{}.withDefaults(), t)
}

// ClaimStep implements StepClaimer: under the store's lock it re-reads
// user's last accepted step from the file and, only if stepStart is after
// it, writes stepStart as the new one (synced before it returns). It
// returns false when this step or a later one was already accepted, by
// this process or another sharing the file. secret is the secret the code
// was checked against: if the file now holds another one (re-enrolled
// since this process loaded it), the claim fails with ErrSecretChanged and
// the store adopts the file's content. A user no longer in the file fails
// with ErrNotEnrolled.
//
// It does file I/O under an flock; callers keep it off event loops.
func (s *FileStore) ClaimStep(user string, stepStart int64, secret string) (bool, error) {
	var claimed bool
	err := s.update(func(users map[string]storedUser) error {
		u, ok := users[user]
		switch {
		case !ok:
			return fmt.Errorf("user %q: %w", user, ErrNotEnrolled)
		case u.Secret != secret:
			return fmt.Errorf("user %q: %w", user, ErrSecretChanged)
		case u.LastStep >= stepStart:
			return errUnchanged
		}
		u.LastStep = stepStart
		users[user] = u
		claimed = true
		return nil
	})
	return claimed, err
}

// Remove deletes user's enrollment from the file, and with it the user's
// passkeys and enrollment links: they sign in only as a second factor of
// an enrolled user.
func (s *FileStore) Remove(user string) error {
	return s.updateContent(func(c *storeContent) error {
		if _, ok := c.users[user]; !ok {
			return fmt.Errorf("user %q: %w", user, ErrNotEnrolled)
		}
		delete(c.users, user)
		c.passkeys.removeUser(user)
		return nil
	})
}

// errUnchanged, returned by an update's change, means: write nothing, but
// adopt the content just read.
var errUnchanged = errors.New("unchanged")

// update applies change to the file's current content under the directory
// lock, writes it, and makes it this store's content. When change fails
// with ErrNotEnrolled, ErrSecretChanged or errUnchanged, nothing is written
// and the content read is adopted (it is newer than ours); the error is
// returned, except errUnchanged.
func (s *FileStore) update(change func(map[string]storedUser) error) error {
	return s.updateAll(func(users map[string]storedUser, _ *accountSet) error { return change(users) })
}

// updateAll is update with the accounts too (accounts.go).
func (s *FileStore) updateAll(change func(map[string]storedUser, *accountSet) error) error {
	return s.updateContent(func(c *storeContent) error { return change(c.users, &c.accts) })
}

// updateContent is update with the whole content: users, accounts and
// passkeys (passkeystore.go). Enrollment links that expired are dropped
// from what is written (a used one was deleted when it was used).
func (s *FileStore) updateContent(change func(*storeContent) error) error {
	unlock, err := lockDir(s.path)
	if err != nil {
		return err
	}
	defer unlock()
	c, err := readStoreAll(s.path, s.keys.Load())
	if err != nil {
		return err
	}
	if err := change(&c); err != nil {
		if errors.Is(err, errUnchanged) || errors.Is(err, ErrNotEnrolled) || errors.Is(err, ErrSecretChanged) {
			s.adopt(c)
		}
		if errors.Is(err, errUnchanged) {
			return nil
		}
		return err
	}
	c.passkeys.pruneLinks(time.Now())
	keys := s.keys.Load()
	if err := writeStore(s.path, c, keys); err != nil {
		return err
	}
	c.plain = 0
	if keys == nil {
		c.plain = len(c.users) + len(c.passkeys.byID)
	}
	// Still under the flock, so stores adopt contents in the order the
	// file had them.
	s.adopt(c)
	return nil
}

func (s *FileStore) adopt(c storeContent) {
	s.mu.Lock()
	s.users = c.users
	s.accts = c.accts
	s.plain = c.plain
	s.mu.Unlock()
}

// validUser accepts what PostgreSQL accepts as a role name, less control
// characters (they would corrupt logs and the otpauth label).
func validUser(user string) error {
	if user == "" {
		return errors.New("empty user name")
	}
	if len(user) > 63 {
		return fmt.Errorf("user name %.20q... is longer than PostgreSQL's 63 bytes", user)
	}
	for _, r := range user {
		if unicode.IsControl(r) {
			return fmt.Errorf("user name %q contains a control character", user)
		}
	}
	return nil
}

// decodeSecret decodes base32 the way authenticators accept it: any case,
// padding optional.
func decodeSecret(secret string) ([]byte, error) {
	s := strings.ToUpper(strings.TrimRight(strings.TrimSpace(secret), "="))
	b, err := base32.StdEncoding.WithPadding(base32.NoPadding).DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("secret is not base32: %w", err)
	}
	if len(b) == 0 {
		return nil, errors.New("empty secret")
	}
	return b, nil
}
