package admin

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// DefaultTokenFile is where the TCP admin API's token lives unless told
// otherwise: beside the default socket, in a 0700 directory on a tmpfs, so a
// reboot makes a new one.
const DefaultTokenFile = "/run/pgmfa/admin.token"

// minToken is the shortest token accepted from a file an operator wrote.
const minToken = 32

// LoadOrCreateToken returns the token in the file at path, creating the
// file (mode 0600, its directory 0700 when missing) with 32 random bytes,
// hex-encoded, when there is none. An existing file must be a regular file
// that group and others cannot access, holding at least 32 characters.
func LoadOrCreateToken(path string) (string, error) {
	if path == "" {
		return "", errors.New("admin: the TCP admin API needs a token file (--admin-token-file)")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("admin token: %w (choose another place with --admin-token-file)", err)
	}
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", fmt.Errorf("admin token: %w", err)
	}
	tok := hex.EncodeToString(raw[:])
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return readToken(path, true)
	}
	if err != nil {
		return "", fmt.Errorf("admin token: %w (choose another place with --admin-token-file)", err)
	}
	_, err = f.WriteString(tok + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return "", fmt.Errorf("admin token: %w", err)
	}
	return tok, nil
}

// ReadToken reads the token `pgmfa serve` keeps at path.
func ReadToken(path string) (string, error) { return readToken(path, false) }

func readToken(path string, server bool) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		if !server && (errors.Is(err, fs.ErrPermission) || errors.Is(err, fs.ErrNotExist)) {
			return "", fmt.Errorf("admin token: %w (the TCP admin API needs the token `pgmfa serve` wrote; run as the user pgmfa runs as, or root, or pass --admin-token-file)", err)
		}
		return "", fmt.Errorf("admin token: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("admin token: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("admin token: %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("admin token: %s is accessible to group or others (mode %04o); refusing it. Fix with: chmod 600 %s", path, perm, path)
	}
	b, err := io.ReadAll(io.LimitReader(f, 4<<10))
	if err != nil {
		return "", fmt.Errorf("admin token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < minToken || strings.ContainsAny(tok, " \t\r\n") {
		return "", fmt.Errorf("admin token: %s must hold one token of at least %d characters (remove it and `pgmfa serve` writes a new one)", path, minToken)
	}
	return tok, nil
}
