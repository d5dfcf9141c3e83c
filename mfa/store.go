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

	// Accepted steps waiting for the writer (see SetAsyncSteps).
	asyncSteps   atomic.Bool
	stepMu       sync.Mutex
	pendingSteps map[string]int64
	stepKick     chan struct{}
	stepIdle     *sync.Cond
	stepWriting  bool
	stepErr      error
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

// RecordStep records that a code of user's step starting at stepStart was
// accepted (only ever moving forward), so that a restarted proxy does not
// accept it again. After SetAsyncSteps it does not block (see there).
func (s *FileStore) RecordStep(user string, stepStart int64) error {
	if !s.asyncSteps.Load() {
		return s.writeSteps(map[string]int64{user: stepStart})
	}
	s.stepMu.Lock()
	if s.pendingSteps == nil {
		s.pendingSteps = map[string]int64{}
		s.stepKick = make(chan struct{}, 1)
		s.stepIdle = sync.NewCond(&s.stepMu)
		go s.stepWriter()
	}
	if stepStart > s.pendingSteps[user] {
		s.pendingSteps[user] = stepStart
	}
	s.stepMu.Unlock()
	select {
	case s.stepKick <- struct{}{}:
	default:
	}
	return nil
}

func (s *FileStore) stepWriter() {
	for range s.stepKick {
		s.stepMu.Lock()
		batch := s.pendingSteps
		if len(batch) == 0 {
			s.stepMu.Unlock()
			continue
		}
		s.pendingSteps = map[string]int64{}
		s.stepWriting = true
		s.stepMu.Unlock()
		err := s.writeSteps(batch)
		s.stepMu.Lock()
		s.stepWriting = false
		s.stepErr = err
		s.stepIdle.Broadcast()
		s.stepMu.Unlock()
	}
}

// SetAsyncSteps makes RecordStep hand steps to one writer goroutine that
// writes them, coalesced, instead of writing the file itself. The proxy
// verifies codes on its event loop, where a file write with fsync does not
// belong; the price is that a crash can lose the last few milliseconds of
// used steps. Flush waits for the writer.
func (s *FileStore) SetAsyncSteps(on bool) { s.asyncSteps.Store(on) }

func (s *FileStore) writeSteps(steps map[string]int64) error {
	return s.update(func(users map[string]storedUser) error {
		for user, step := range steps {
			if u, ok := users[user]; ok && u.LastStep < step {
				u.LastStep = step
				users[user] = u
			}
		}
		return nil
	})
}

// Flush waits until every step recorded so far is written, and returns the
// last write error.
func (s *FileStore) Flush() error {
	s.stepMu.Lock()
	defer s.stepMu.Unlock()
	for s.stepIdle != nil && (len(s.pendingSteps) > 0 || s.stepWriting) {
		s.stepIdle.Wait()
	}
	return s.stepErr
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
