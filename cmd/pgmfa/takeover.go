package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/pgmfa/pgmfa/loop"
)

// Restart without dropping a session (loop/takeover.go): a serve started
// with --takeover-socket PATH listens there for a successor; a new serve
// started with --takeover PATH (and the same --listen) receives the
// listeners and the spliced sessions, and the old one drains the rest and
// exits 0. The new process gets its own capabilities from whoever starts
// it (it loads its own BPF program for its own logins); the old one needs
// none to hand over (passing fds needs no privilege).

// listenTakeover opens the takeover socket (0600; the peer's uid is
// checked too). replace: the path is the socket of the process this one
// took over, which no longer accepts on it.
func listenTakeover(path string, replace bool) (*net.UnixListener, error) {
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("--takeover-socket %s exists and is not a socket", path)
		}
		if !replace {
			if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
				c.Close()
				return nil, fmt.Errorf("--takeover-socket %s: a process listens there already (take it over with --takeover %s)", path, path)
			}
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("--takeover-socket %s: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("--takeover-socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("--takeover-socket %s: %w", path, err)
	}
	return ln, nil
}

// serveTakeovers lets a successor take over through ln once serving.
func (p *proxy) serveTakeovers(ln *net.UnixListener, path string) {
	p.tkMu.Lock()
	p.tkLn = ln
	p.tkMu.Unlock()
	go func() {
		<-p.srv.Ready()
		if p.srv.Err() != nil {
			return
		}
		p.log.Info("takeover socket listening", "takeover_socket", path)
		p.srv.ServeTakeovers(ln, p.drainTimeout)
	}()
}

// takeOver finishes a takeover begun before Run (the listeners are
// here): it adopts the old process's sessions, then opens this process's
// own takeover socket (path, if any). A takeover that fails before any
// session was handed over leaves the old process serving: this one
// drains and exits non-zero.
func (p *proxy) takeOver(t *loop.Takeover, path string) {
	committed, err := t.Adopt(p.srv)
	if err != nil && !committed {
		p.log.Error("takeover failed: the old process serves on; this one drains what it accepted and exits", "err", err)
		p.failed.Store(true)
		if p.drainTimeout > 0 {
			p.srv.Drain(p.drainTimeout)
		} else {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = p.srv.Stop(ctx)
			cancel()
		}
		return
	}
	if err != nil {
		p.log.Error("takeover incomplete: some sessions stayed with the old process, which drains them", "err", err)
	}
	if path == "" {
		return
	}
	ln, err := listenTakeover(path, true)
	if err != nil {
		p.log.Error("no takeover socket: this process cannot be taken over", "err", err)
		return
	}
	p.serveTakeovers(ln, path)
}

// closeTakeover closes the takeover socket, if any (the path goes with it
// unless a successor took over: ServeTakeovers leaves it to that one).
func (p *proxy) closeTakeover() {
	p.tkMu.Lock()
	defer p.tkMu.Unlock()
	if p.tkLn != nil {
		p.tkLn.Close()
	}
}
