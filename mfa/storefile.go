package mfa

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// storeVersion is the format of the store file.
const storeVersion = 1

// storeFile is the JSON document on disk.
type storeFile struct {
	Version int                   `json:"version"`
	Users   map[string]storedUser `json:"users"`
	// The accounts pgmfa authenticates itself (--auth accounts; accounts.go).
	Accounts      map[string]storedAccount `json:"accounts,omitempty"`
	AccountSecret string                   `json:"account_secret,omitempty"`
	// The passkeys and their open enrollment links (passkeystore.go); a
	// file written before them has neither and reads as having none.
	Passkeys     []storedPasskey `json:"passkeys,omitempty"`
	PasskeyLinks []storedLink    `json:"passkey_links,omitempty"`
}

// storeContent is the file's content, opened: what one read-modify-write
// (FileStore.updateContent) changes.
type storeContent struct {
	users    map[string]storedUser
	accts    accountSet
	passkeys passkeySet
	plain    int // records read unencrypted: TOTP secrets and passkeys
}

// storedUser is one enrollment on disk. The TOTP parameters are stored so
// that changing the server's defaults later does not break authenticators
// that were set up with the old ones.
type storedUser struct {
	Secret    string    `json:"secret"`    // in memory base32; on disk base32 (before encryption) or sealed (seal.go)
	Digits    int       `json:"digits"`    // 6 or 8
	Period    int       `json:"period"`    // seconds
	Algorithm string    `json:"algorithm"` // SHA1, SHA256, SHA512
	Issuer    string    `json:"issuer,omitempty"`
	Enrolled  time.Time `json:"enrolled,omitempty"`
	LastStep  int64     `json:"last_step,omitempty"` // unix second of the last accepted code's step
}

func (u storedUser) account() Account {
	return Account{Secret: u.Secret, Digits: u.Digits, Period: time.Duration(u.Period) * time.Second, Algorithm: u.Algorithm, LastStep: u.LastStep}
}

// readStoreAll reads and checks the file at path. A missing file is an empty
// store. The file must not be open to group or others: it holds the secrets.
//
// Sealed secrets are opened with keys; a plaintext secret (a store written
// before encryption) is read as it is and counted in plain.
//
// The accounts (accounts.go) and the passkeys (passkeystore.go) are opened
// the same way.
func readStoreAll(path string, keys *Keyring) (storeContent, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return storeContent{users: map[string]storedUser{}, accts: newAccountSet(), passkeys: newPasskeySet()}, nil
	}
	if err != nil {
		return storeContent{}, fmt.Errorf("TOTP store: %w", err)
	}
	defer f.Close()
	// Stat the open file, not the path, so the check and the read are of
	// the same file.
	fi, err := f.Stat()
	if err != nil {
		return storeContent{}, fmt.Errorf("TOTP store: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return storeContent{}, fmt.Errorf("TOTP store %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return storeContent{}, fmt.Errorf("TOTP store %s is accessible to group or others (mode %04o) and holds secrets; refusing it. Fix with: chmod 600 %s", path, perm, path)
	}
	var doc storeFile
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&doc); err != nil {
		return storeContent{}, fmt.Errorf("TOTP store %s: %w", path, err)
	}
	if doc.Version != storeVersion {
		return storeContent{}, fmt.Errorf("TOTP store %s: version %d, this pgmfa reads version %d", path, doc.Version, storeVersion)
	}
	if doc.Users == nil {
		doc.Users = map[string]storedUser{}
	}
	plain := 0
	for name, u := range doc.Users {
		if err := validUser(name); err != nil {
			return storeContent{}, fmt.Errorf("TOTP store %s: %w", path, err)
		}
		if Sealed(u.Secret) {
			secret, err := keys.Open(name, u.Secret)
			if err != nil {
				return storeContent{}, fmt.Errorf("TOTP store %s: user %q: %w", path, name, err)
			}
			u.Secret = secret
			doc.Users[name] = u
		} else {
			plain++
		}
		if err := u.check(); err != nil {
			return storeContent{}, fmt.Errorf("TOTP store %s: user %q: %w", path, name, err)
		}
	}
	accts, err := openAccounts(path, doc, keys)
	if err != nil {
		return storeContent{}, err
	}
	pks, pkPlain, err := openPasskeys(doc, keys)
	if err != nil {
		return storeContent{}, fmt.Errorf("TOTP store %s: %w", path, err)
	}
	return storeContent{users: doc.Users, accts: accts, passkeys: pks, plain: plain + pkPlain}, nil
}

// check rejects an entry that could never verify a code.
func (u storedUser) check() error {
	if u.Secret == "" {
		return errors.New("empty secret")
	}
	if _, err := decodeSecret(u.Secret); err != nil {
		return err
	}
	if u.Digits != 6 && u.Digits != 8 {
		return fmt.Errorf("digits must be 6 or 8, got %d", u.Digits)
	}
	if u.Period <= 0 {
		return fmt.Errorf("period must be positive seconds, got %d", u.Period)
	}
	if _, err := canonicalAlgorithm(u.Algorithm); err != nil || u.Algorithm == "" {
		return fmt.Errorf("algorithm must be SHA1, SHA256 or SHA512, got %q", u.Algorithm)
	}
	return nil
}

// writeStore replaces the file at path atomically: a temporary file in the
// same directory, mode 0600, synced, renamed over the old one, and the
// directory synced so the rename survives a crash.
//
// With keys, every secret is written sealed with the current key (a
// plaintext store becomes encrypted on its first write with a key).
func writeStore(path string, c storeContent, keys *Keyring) (err error) {
	disk := make(map[string]storedUser, len(c.users))
	for name, u := range c.users {
		if u.Secret, err = keys.Seal(name, u.Secret); err != nil {
			return fmt.Errorf("TOTP store: encrypt the secret of %q: %w", name, err)
		}
		disk[name] = u
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	doc := storeFile{Version: storeVersion, Users: disk}
	if err := sealAccounts(&doc, c.accts, keys); err != nil {
		return err
	}
	if err := sealPasskeys(&doc, c.passkeys, keys); err != nil {
		return err
	}
	if err := enc.Encode(doc); err != nil {
		return err
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("TOTP store: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	// CreateTemp already uses 0600; say it anyway, it is the point.
	if err = tmp.Chmod(0o600); err != nil {
		return fmt.Errorf("TOTP store: %w", err)
	}
	if _, err = tmp.Write(buf.Bytes()); err != nil {
		return fmt.Errorf("TOTP store: %w", err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("TOTP store: %w", err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("TOTP store: %w", err)
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("TOTP store: %w", err)
	}
	if d, derr := os.Open(dir); derr == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// lockDir takes an exclusive flock on the store's directory (created 0700 if
// missing) so that two `pgmfa enroll` runs cannot lose each other's writes.
// The lock is advisory and released by the returned function.
func lockDir(path string) (unlock func(), err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("TOTP store: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("TOTP store: %w", err)
	}
	if err := syscall.Flock(int(d.Fd()), syscall.LOCK_EX); err != nil {
		d.Close()
		return nil, fmt.Errorf("TOTP store: lock %s: %w", dir, err)
	}
	return func() {
		_ = syscall.Flock(int(d.Fd()), syscall.LOCK_UN)
		d.Close()
	}, nil
}
