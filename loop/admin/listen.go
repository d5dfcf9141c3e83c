package admin

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/pgmfa/pgmfa/loop/internal/localsock"
)

// DefaultSocket is where the admin API listens unless told otherwise.
const DefaultSocket = "/run/pgmfa/admin.sock"

// IsUnix reports whether addr names a unix socket rather than host:port.
// A path has a slash; anything else that does not parse as host:port with a
// numeric port is taken as a path relative to the working directory.
func IsUnix(addr string) bool {
	if strings.Contains(addr, "/") {
		return true
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return true
	}
	_, err = strconv.ParseUint(port, 10, 16)
	return err != nil
}

// Listen opens the admin API's listener. A unix-socket path gets its
// directory created 0700 when missing and the socket 0600; a stale socket
// left by a crashed process is replaced, a live one is an error. A TCP
// address must be loopback: the API releases logins, and the network must
// not reach it; its requests need the token (NewServer).
func Listen(addr string) (net.Listener, error) {
	if addr == "" {
		return nil, errors.New("admin: empty address")
	}
	if strings.HasPrefix(addr, "@") {
		return nil, fmt.Errorf("admin: %s is an abstract unix socket, which has no file permissions to protect it; use a path", addr)
	}
	if IsUnix(addr) {
		return listenUnix(addr)
	}
	return listenLoopback(addr)
}

func listenLoopback(addr string) (net.Listener, error) {
	host, _, _ := net.SplitHostPort(addr)
	if host == "" {
		return nil, fmt.Errorf("admin: %s listens on every interface; the admin API must be on loopback (e.g. 127.0.0.1%s) or a unix socket", addr, addr)
	}
	if ip := net.ParseIP(host); ip != nil && !ip.IsLoopback() {
		return nil, fmt.Errorf("admin: %s is not a loopback address; the admin API must be on loopback (127.0.0.1, ::1) or a unix socket", addr)
	}
	return localsock.ListenLoopback("admin", addr)
}

func listenUnix(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("admin: %w", err)
		}
	}
	return localsock.ListenUnix("admin", path, 0o600)
}
