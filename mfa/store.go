package mfa

import (
	"encoding/base32"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
	"unicode"
)

// Errors of FileStore.Enroll and FileStore.Remove, for errors.Is.
var (
	ErrAlreadyEnrolled = errors.New("already enrolled; use --force to rotate the secret")
	ErrNotEnrolled     = errors.New("not enrolled")
)

// FileStore keeps per-user secrets and their TOTP parameters in a JSON file.
// Loading refuses a file that group or others can read or write; writes are
// atomic with mode 0600. It implements Secrets and Accounts and is safe for
// concurrent use.
//
// The running proxy only reads the file (OpenFileStore, Reload on SIGHUP);
// `pgmfa enroll` writes it. Writers take an flock on the directory and
// re-read the file first, so concurrent enrolls do not lose each other's
// users.
type FileStore struct {
	path string

	mu    sync.RWMutex
	users map[string]storedUser
}

// OpenFileStore loads the store at path. A missing file is an empty store;
// it is created by the first Enroll.
func OpenFileStore(path string) (*FileStore, error) {
	users, err := readStore(path)
	if err != nil {
		return nil, err
	}
	return &FileStore{path: path, users: users}, nil
}

// Path is the file the store lives in.
func (s *FileStore) Path() string { return s.path }

// Reload re-reads the file (SIGHUP). On error the old content stays in use.
// A file that was deleted reloads as empty: removing the store removes
// everyone's access, which is the safe reading of that action.
func (s *FileStore) Reload() error {
	users, err := readStore(s.path)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.users = users
	s.mu.Unlock()
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

// Remove deletes user's enrollment from the file.
func (s *FileStore) Remove(user string) error {
	return s.update(func(users map[string]storedUser) error {
		if _, ok := users[user]; !ok {
			return fmt.Errorf("user %q: %w", user, ErrNotEnrolled)
		}
		delete(users, user)
		return nil
	})
}

// update applies change to the file's current content under the directory
// lock, writes it, and makes it this store's content.
func (s *FileStore) update(change func(map[string]storedUser) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	unlock, err := lockDir(s.path)
	if err != nil {
		return err
	}
	defer unlock()
	users, err := readStore(s.path)
	if err != nil {
		return err
	}
	if err := change(users); err != nil {
		return err
	}
	if err := writeStore(s.path, users); err != nil {
		return err
	}
	s.users = users
	return nil
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
