package admin

import (
	"context"
	"net"
	"syscall"
)

// peerKey is the context key of the connecting process's credentials.
type peerKey struct{}

// ConnContext records, for unix-socket connections, the uid and pid of the
// process on the other end (SO_PEERCRED), so approvals are logged with who
// made them. Wire it as http.Server.ConnContext; without it the log line
// simply has no approver.
func (s *Server) ConnContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *syscall.Ucred
	_ = raw.Control(func(fd uintptr) {
		cred, err = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	if err != nil || cred == nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, *cred)
}

// peerAttrs are the log attributes of the approver, if known.
func peerAttrs(ctx context.Context) []any {
	cred, ok := ctx.Value(peerKey{}).(syscall.Ucred)
	if !ok {
		return nil
	}
	return []any{"approver_uid", cred.Uid, "approver_pid", cred.Pid}
}
