package admin

import (
	"context"
	"fmt"
	"net"
	"syscall"
)

// peerKey is the context key of the connection's peer.
type peerKey struct{}

// peer is who is on the other end of an admin connection.
type peer struct {
	unix  bool
	cred  *syscall.Ucred // unix: the connecting process, when known
	local string         // TCP: the address the connection was accepted on
}

// ConnContext records what the handler needs to know about a connection:
// its transport, the local address of a TCP one (Host check), and for a
// unix-socket one the uid and pid of the process on the other end
// (SO_PEERCRED), which name the approver. HTTPServer wires it; a connection
// that bypassed it is treated as TCP from an unknown address, which every
// request fails.
func (s *Server) ConnContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return context.WithValue(ctx, peerKey{}, peer{local: c.LocalAddr().String()})
	}
	p := peer{unix: true}
	if raw, err := uc.SyscallConn(); err == nil {
		_ = raw.Control(func(fd uintptr) {
			if cred, err := syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED); err == nil {
				p.cred = cred
			}
		})
	}
	return context.WithValue(ctx, peerKey{}, p)
}

func peerOf(ctx context.Context) peer {
	p, _ := ctx.Value(peerKey{}).(peer)
	return p
}

// approver is the identity an approval is charged to: the peer's uid on the
// unix socket, the token on TCP (there is one).
func (p peer) approver() string {
	switch {
	case p.unix && p.cred != nil:
		return fmt.Sprintf("uid:%d", p.cred.Uid)
	case p.unix:
		return "unix"
	}
	return "token"
}

// attrs are the log attributes of the approver.
func (p peer) attrs() []any {
	if p.cred != nil {
		return []any{"approver", p.approver(), "approver_uid", p.cred.Uid, "approver_pid", p.cred.Pid}
	}
	return []any{"approver", p.approver()}
}
