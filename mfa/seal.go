package mfa

import (
	"bufio"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// Secrets at rest are sealed with AES-256-GCM. The user name is the
// associated data, so a sealed secret copied onto another user's record does
// not open. Each sealed value names the key it was sealed with (the key id:
// the first 8 bytes of the key's SHA-256, hex), so a keyring may hold the
// current key and older ones while `pgmfa store rotate-key` re-seals every
// record under the current one: instances that hold both keys keep working
// throughout.

// sealPrefix starts every sealed value; a version for the envelope format.
const sealPrefix = "aes256gcm:"

// KeyEnv is the environment variable that may hold the keyring's text
// instead of a --store-key-file.
const KeyEnv = "PGMFA_STORE_KEY"

// Errors of sealing, for errors.Is.
var (
	// ErrNoKey: the store holds sealed secrets and no key was given.
	ErrNoKey = errors.New("the store's secrets are encrypted and no key was given (--store-key-file, or the environment variable " + KeyEnv + ")")
	// ErrUnknownKey: a record was sealed with a key that is not in the keyring.
	ErrUnknownKey = errors.New("encrypted with a key that is not in the key file")
	// ErrTampered: the sealed value does not open with its key (tampered,
	// truncated, moved to another user, or a wrong key with the same id).
	ErrTampered = errors.New("encrypted secret does not decrypt: it was altered, or belongs to another user")
)

// Keyring holds the keys secrets are sealed with. The first key seals; every
// key opens. A nil *Keyring seals nothing (plaintext store).
type Keyring struct {
	keys []sealKey
}

type sealKey struct {
	id   string
	aead cipher.AEAD
}

// KeySize is the length of a key in bytes (AES-256).
const KeySize = 32

// NewKeyText returns a fresh random key as a key-file line.
func NewKeyText() (string, error) {
	k := make([]byte, KeySize)
	if _, err := io.ReadFull(rand.Reader, k); err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(k), nil
}

// ParseKeyring reads a key file: one base64 key (32 bytes) per line, the
// first one current; blank lines and lines starting with # are ignored.
func ParseKeyring(text string) (*Keyring, error) {
	kr := &Keyring{}
	seen := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(text))
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		raw, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			return nil, fmt.Errorf("key file line %d: not base64 (want %d random bytes in base64, as `pgmfa store new-key` writes)", n, KeySize)
		}
		if len(raw) != KeySize {
			return nil, fmt.Errorf("key file line %d: key is %d bytes, want %d (AES-256)", n, len(raw), KeySize)
		}
		k, err := newSealKey(raw)
		if err != nil {
			return nil, err
		}
		if seen[k.id] {
			return nil, fmt.Errorf("key file line %d: the same key twice (id %s)", n, k.id)
		}
		seen[k.id] = true
		kr.keys = append(kr.keys, k)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	if len(kr.keys) == 0 {
		return nil, errors.New("key file holds no key")
	}
	return kr, nil
}

func newSealKey(raw []byte) (sealKey, error) {
	block, err := aes.NewCipher(raw)
	if err != nil {
		return sealKey{}, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return sealKey{}, err
	}
	sum := sha256.Sum256(raw)
	return sealKey{id: hex.EncodeToString(sum[:8]), aead: aead}, nil
}

// LoadKeyring reads the keyring from path, or when path is empty from the
// environment variable KeyEnv; neither gives a nil keyring (no encryption).
// A key file readable by group or others is refused: it is the secret.
func LoadKeyring(path string) (*Keyring, error) {
	if path == "" {
		text := os.Getenv(KeyEnv)
		if text == "" {
			return nil, nil
		}
		kr, err := ParseKeyring(text)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", KeyEnv, err)
		}
		return kr, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("store key: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("store key: %w", err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("store key file %s is accessible to group or others (mode %04o); refusing it. Fix with: chmod 600 %s", path, perm, path)
	}
	b, err := io.ReadAll(io.LimitReader(f, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("store key: %w", err)
	}
	kr, err := ParseKeyring(string(b))
	if err != nil {
		return nil, fmt.Errorf("store key file %s: %w", path, err)
	}
	return kr, nil
}

// CurrentID is the id of the key new records are sealed with ("" for nil).
func (k *Keyring) CurrentID() string {
	if k == nil {
		return ""
	}
	return k.keys[0].id
}

// IDs are the ids of every key, current first.
func (k *Keyring) IDs() []string {
	if k == nil {
		return nil
	}
	out := make([]string, len(k.keys))
	for i, s := range k.keys {
		out[i] = s.id
	}
	return out
}

// Sealed reports whether a stored value is sealed (else it is a plaintext
// secret written before encryption).
func Sealed(v string) bool { return strings.HasPrefix(v, sealPrefix) }

// Seal encrypts secret for user with the current key. A nil keyring
// returns secret unchanged (plaintext store).
func (k *Keyring) Seal(user, secret string) (string, error) {
	if k == nil {
		return secret, nil
	}
	key := k.keys[0]
	nonce := make([]byte, key.aead.NonceSize())
	if _, err := io.ReadFull(rand.Reader, nonce); err != nil {
		return "", err
	}
	ct := key.aead.Seal(nonce, nonce, []byte(secret), []byte(user))
	return sealPrefix + key.id + ":" + base64.RawURLEncoding.EncodeToString(ct), nil
}

// Open returns the secret of user from its stored value: a sealed value is
// decrypted (user is the associated data), a plaintext one is returned as
// it is.
func (k *Keyring) Open(user, stored string) (string, error) {
	if !Sealed(stored) {
		return stored, nil
	}
	id, ct, err := splitSealed(stored)
	if err != nil {
		return "", err
	}
	if k == nil {
		return "", ErrNoKey
	}
	for _, key := range k.keys {
		if key.id != id {
			continue
		}
		ns := key.aead.NonceSize()
		if len(ct) < ns+key.aead.Overhead() {
			return "", ErrTampered
		}
		pt, err := key.aead.Open(nil, ct[:ns], ct[ns:], []byte(user))
		if err != nil {
			return "", ErrTampered
		}
		return string(pt), nil
	}
	return "", fmt.Errorf("key id %s: %w (it holds %s)", id, ErrUnknownKey, strings.Join(k.IDs(), ", "))
}

// splitSealed parses "aes256gcm:<16 hex>:<base64url>".
func splitSealed(v string) (id string, ct []byte, err error) {
	rest, ok := strings.CutPrefix(v, sealPrefix)
	if !ok {
		return "", nil, errors.New("not an encrypted secret")
	}
	id, b64, ok := strings.Cut(rest, ":")
	if !ok || len(id) != 16 {
		return "", nil, fmt.Errorf("malformed encrypted secret: %w", ErrTampered)
	}
	if _, err := hex.DecodeString(id); err != nil {
		return "", nil, fmt.Errorf("malformed encrypted secret: %w", ErrTampered)
	}
	ct, err = base64.RawURLEncoding.DecodeString(b64)
	if err != nil {
		return "", nil, fmt.Errorf("malformed encrypted secret: %w", ErrTampered)
	}
	return id, ct, nil
}
