package mfa

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"time"
)

// Accounts held by pgmfa (`pgmfa serve --auth accounts`): each account has
// a password verifier (never the password: PostgreSQL's own
// SCRAM-SHA-256 or MD5 format, see proto.ParseVerifier) and the database
// role with the password pgmfa logs in upstream with. They live in the
// same file as the second factors and are sealed the same way (seal.go):
// the verifier and the database password each under their own associated
// data, so neither can be moved onto another account or record.

// Errors of the account operations, for errors.Is.
var (
	ErrAccountExists = errors.New("account already exists; use `pgmfa account passwd` to change its password")
	ErrNoAccount     = errors.New("no such account")
	// ErrCredentialNeedsKey: a database password is only stored sealed.
	ErrCredentialNeedsKey = errors.New("a database password is stored only encrypted: give --store-key-file (see `pgmfa store new-key`) or " + KeyEnv)
)

// AccountRecord is one account, opened (as held in memory).
type AccountRecord struct {
	// Verifier is the password verifier in PostgreSQL's stored form.
	Verifier string
	// Role and DBPassword are the database login pgmfa uses for the
	// account (an empty DBPassword: the database asks for none).
	Role, DBPassword string
	Created          time.Time
}

// storedAccount is an AccountRecord on disk; with a key, Verifier and
// DBPassword are sealed.
type storedAccount struct {
	Verifier   string    `json:"verifier"`
	Role       string    `json:"role"`
	DBPassword string    `json:"db_password,omitempty"`
	Created    time.Time `json:"created,omitzero"`
}

// accountSet is the accounts part of a store, opened.
type accountSet struct {
	byName map[string]AccountRecord
	// secret keys the dummy salts of unknown accounts (proto.Roles.SetMock):
	// random, made with the first account, kept so that a restart does not
	// change them.
	secret []byte
}

func newAccountSet() accountSet { return accountSet{byName: map[string]AccountRecord{}} }

// The associated data of each sealed field.
func verifierAD(name string) string { return "account-verifier:" + name }
func dbPasswordAD(name string) string {
	return "account-db-password:" + name
}

const accountSecretAD = "account-secret"

// openAccounts opens the accounts of a decoded store file.
func openAccounts(path string, doc storeFile, keys *Keyring) (accountSet, error) {
	set := newAccountSet()
	for name, a := range doc.Accounts {
		if err := validUser(name); err != nil {
			return set, fmt.Errorf("store %s: account: %w", path, err)
		}
		rec, err := OpenAccount(keys, name, a.Verifier, a.Role, a.DBPassword)
		if err != nil {
			return set, fmt.Errorf("store %s: %w", path, err)
		}
		rec.Created = a.Created
		set.byName[name] = rec
	}
	if doc.AccountSecret != "" {
		sec, err := OpenAccountSecret(keys, doc.AccountSecret)
		if err != nil {
			return set, fmt.Errorf("store %s: %w", path, err)
		}
		set.secret = sec
	}
	return set, nil
}

// OpenAccount opens an account's stored fields (for every store kind).
func OpenAccount(keys *Keyring, name, verifier, role, dbPassword string) (AccountRecord, error) {
	v, err := keys.Open(verifierAD(name), verifier)
	if err != nil {
		return AccountRecord{}, fmt.Errorf("account %q: verifier: %w", name, err)
	}
	if !Sealed(dbPassword) && dbPassword != "" {
		return AccountRecord{}, fmt.Errorf("account %q: the database password is not encrypted; refusing it", name)
	}
	pw, err := keys.Open(dbPasswordAD(name), dbPassword)
	if err != nil {
		return AccountRecord{}, fmt.Errorf("account %q: database password: %w", name, err)
	}
	if role == "" || v == "" {
		return AccountRecord{}, fmt.Errorf("account %q: empty role or verifier", name)
	}
	return AccountRecord{Verifier: v, Role: role, DBPassword: pw}, nil
}

// SealAccount seals an account's verifier and database password for
// storage with keys (the verifier stays readable without a key; a
// database password needs one: ErrCredentialNeedsKey).
func SealAccount(keys *Keyring, name string, a AccountRecord) (verifier, dbPassword string, err error) {
	if a.DBPassword != "" && keys == nil {
		return "", "", fmt.Errorf("account %q: %w", name, ErrCredentialNeedsKey)
	}
	if verifier, err = keys.Seal(verifierAD(name), a.Verifier); err != nil {
		return "", "", err
	}
	if a.DBPassword != "" {
		if dbPassword, err = keys.Seal(dbPasswordAD(name), a.DBPassword); err != nil {
			return "", "", err
		}
	}
	return verifier, dbPassword, nil
}

// NewAccountSecret returns a fresh secret for unknown accounts' salts.
func NewAccountSecret() ([]byte, error) {
	b := make([]byte, 32)
	_, err := rand.Read(b)
	return b, err
}

// SealAccountSecret and OpenAccountSecret store the secret behind unknown
// accounts' salts.
func SealAccountSecret(keys *Keyring, secret []byte) (string, error) {
	return keys.Seal(accountSecretAD, hex.EncodeToString(secret))
}

func OpenAccountSecret(keys *Keyring, stored string) ([]byte, error) {
	h, err := keys.Open(accountSecretAD, stored)
	if err != nil {
		return nil, fmt.Errorf("account secret: %w", err)
	}
	b, err := hex.DecodeString(h)
	if err != nil || len(b) == 0 {
		return nil, errors.New("account secret is not hex")
	}
	return b, nil
}

// sealAccounts puts set into doc, sealed with keys.
func sealAccounts(doc *storeFile, set accountSet, keys *Keyring) error {
	if len(set.byName) > 0 {
		doc.Accounts = make(map[string]storedAccount, len(set.byName))
	}
	for name, a := range set.byName {
		v, pw, err := SealAccount(keys, name, a)
		if err != nil {
			return err
		}
		doc.Accounts[name] = storedAccount{Verifier: v, Role: a.Role, DBPassword: pw, Created: a.Created}
	}
	if len(set.secret) > 0 {
		sec, err := SealAccountSecret(keys, set.secret)
		if err != nil {
			return err
		}
		doc.AccountSecret = sec
	}
	return nil
}

// AddAccount stores a new account (ErrAccountExists if it exists).
// rec.Verifier must already be a verifier; the caller makes it.
func (s *FileStore) AddAccount(name string, rec AccountRecord) error {
	if err := validUser(name); err != nil {
		return err
	}
	if rec.Role == "" {
		return errors.New("empty database role")
	}
	if rec.DBPassword != "" && s.keys.Load() == nil {
		return ErrCredentialNeedsKey
	}
	return s.updateAll(func(_ map[string]storedUser, set *accountSet) error {
		if _, ok := set.byName[name]; ok {
			return fmt.Errorf("account %q: %w", name, ErrAccountExists)
		}
		if len(set.secret) == 0 {
			var err error
			if set.secret, err = NewAccountSecret(); err != nil {
				return err
			}
		}
		if rec.Created.IsZero() {
			rec.Created = time.Now().UTC().Truncate(time.Second)
		}
		set.byName[name] = rec
		return nil
	})
}

// SetAccountVerifier replaces an account's verifier (`pgmfa account
// passwd`).
func (s *FileStore) SetAccountVerifier(name, verifier string) error {
	return s.updateAll(func(_ map[string]storedUser, set *accountSet) error {
		a, ok := set.byName[name]
		if !ok {
			return fmt.Errorf("account %q: %w", name, ErrNoAccount)
		}
		a.Verifier = verifier
		set.byName[name] = a
		return nil
	})
}

// RemoveAccount deletes an account; its logins fail like unknown users'.
func (s *FileStore) RemoveAccount(name string) error {
	return s.updateAll(func(_ map[string]storedUser, set *accountSet) error {
		if _, ok := set.byName[name]; !ok {
			return fmt.Errorf("account %q: %w", name, ErrNoAccount)
		}
		delete(set.byName, name)
		return nil
	})
}

// AccountNames returns the accounts, sorted.
func (s *FileStore) AccountNames() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]string, 0, len(s.accts.byName))
	for n := range s.accts.byName {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// LookupAccount returns an account as last read.
func (s *FileStore) LookupAccount(name string) (AccountRecord, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	a, ok := s.accts.byName[name]
	return a, ok
}

// AccountSecret is the server secret behind unknown accounts' dummy salts
// (nil until the first account is added).
func (s *FileStore) AccountSecret() []byte {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.accts.secret
}

// ValidAccountName accepts what PostgreSQL accepts as a role name, less
// control characters.
func ValidAccountName(name string) error { return validUser(name) }
