package admin

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
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
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	// A name like "localhost" resolves through the system; check what it
	// actually bound to.
	if tcp, ok := ln.Addr().(*net.TCPAddr); !ok || !tcp.IP.IsLoopback() {
		ln.Close()
		return nil, fmt.Errorf("admin: %s resolved to %s, which is not loopback", addr, ln.Addr())
	}
	return ln, nil
}

func listenUnix(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("admin: %w", err)
		}
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("admin: %s exists and is not a socket; remove it or choose another --admin path", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("admin: %s is in use by another running process (another pgmfa?)", path)
		}
		// Stale: left behind by a process that died.
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("admin: remove stale socket: %w", err)
		}
	}
	// Bind under a temporary name, restrict it, then rename it into place,
	// so the socket is never reachable at its real path with the umask's
	// looser mode (changing the umask would race with the rest of the
	// process).
	// The temporary name is no longer than "admin.sock", so a path that
	// fits the kernel's 108 bytes still fits while temporary.
	var rnd [4]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(dir, "."+hex.EncodeToString(rnd[:]))
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("admin: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("admin: %w", err)
	}
	return &unixListener{UnixListener: ln, path: path}, nil
}

// unixListener removes its socket file when closed: the socket was renamed,
// so the standard listener would unlink the wrong name.
type unixListener struct {
	*net.UnixListener
	path string
	once sync.Once
}

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() { os.Remove(l.path) })
	return err
}

// Addr reports the socket's real path, not the temporary one it was bound
// under.
func (l *unixListener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }
