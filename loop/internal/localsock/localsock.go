// Package localsock opens listeners that only this host can reach: a unix
// socket with a fixed mode, or a TCP address that must bind to loopback.
// The admin API (--admin) and the metrics (--metrics) both serve on one;
// each checks the address it is given in its own words first, and names
// itself (prefix) in the errors from here.
package localsock

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// ListenLoopback listens on the TCP address addr and refuses the result
// unless it is bound to loopback: a name like "localhost" resolves through
// the system, so only the bound address says where it really listens.
func ListenLoopback(prefix, addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", prefix, err)
	}
	if tcp, ok := ln.Addr().(*net.TCPAddr); !ok || !tcp.IP.IsLoopback() {
		ln.Close()
		return nil, fmt.Errorf("%s: %s resolved to %s, which is not loopback", prefix, addr, ln.Addr())
	}
	return ln, nil
}

// ListenUnix listens on the unix socket path with the given mode. A stale
// socket left by a process that died is replaced; a live one, or a file
// that is not a socket, is an error. The socket is bound under a temporary
// name in the same directory, given its mode, then renamed into place, so
// it is never reachable at path with the umask's looser mode (changing the
// umask would race with the rest of the process). Closing the listener
// removes path.
func ListenUnix(prefix, path string, mode os.FileMode) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("%s: %s exists and is not a socket; remove it or choose another path", prefix, path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: %s is in use by another running process (another pgmfa?)", prefix, path)
		}
		// Stale: left behind by a process that died.
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("%s: remove stale socket: %w", prefix, err)
		}
	}
	// The temporary name is 9 bytes, no longer than the shortest socket
	// name pgmfa uses by default, so a path that fits the kernel's 108
	// bytes still fits while temporary.
	var rnd [4]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(filepath.Dir(path), "."+hex.EncodeToString(rnd[:]))
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", prefix, err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, mode); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("%s: %w", prefix, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("%s: %w", prefix, err)
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
