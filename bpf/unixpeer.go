package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// unix_diag (include/uapi/linux/unix_diag.h), used to learn the cookie of
// the other end of a connected unix socket: the database's end, which the
// kernel names as the owner of the bytes it sends us (see splice.c).
const (
	udiagShowPeer  = 0x4 // UDIAG_SHOW_PEER
	unixDiagPeer   = 2   // UNIX_DIAG_PEER attribute: the peer's inode (u32)
	unixDiagReqLen = 24  // struct unix_diag_req
	unixDiagMsgLen = 16  // struct unix_diag_msg
	nlmsgHdrLen    = 16
)

var diagSeq atomic.Uint32

// unixPeerCookie returns the socket cookie of the peer of the connected
// unix stream socket fd. Two exact sock_diag queries: fd's own inode with
// UDIAG_SHOW_PEER gives the peer's inode, and the peer's inode gives its
// cookie (unix_diag_msg.udiag_cookie is sock_gen_cookie, the value
// bpf_get_socket_cookie returns). Needs CONFIG_UNIX_DIAG; unprivileged.
func unixPeerCookie(fd int) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, err
	}
	nl, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return 0, fmt.Errorf("sock_diag socket: %w", err)
	}
	defer unix.Close(nl)
	_, peer, err := unixDiag(nl, uint32(st.Ino), udiagShowPeer)
	if err != nil {
		return 0, fmt.Errorf("unix_diag of the proxy's socket: %w", err)
	}
	if peer == 0 {
		return 0, errors.New("unix_diag: the socket has no peer (it is not connected)")
	}
	cookie, _, err := unixDiag(nl, peer, 0)
	if err != nil {
		return 0, fmt.Errorf("unix_diag of the peer socket (inode %d): %w", peer, err)
	}
	return cookie, nil
}

// unixDiag asks for one unix socket by inode and returns its cookie and,
// when show asks for it, its peer's inode.
func unixDiag(nl int, ino uint32, show uint32) (cookie uint64, peer uint32, err error) {
	seq := diagSeq.Add(1)
	req := make([]byte, nlmsgHdrLen+unixDiagReqLen)
	le := binary.LittleEndian // netlink is host order; this package builds for bpfel only
	le.PutUint32(req[0:], uint32(len(req)))
	le.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	le.PutUint16(req[6:], unix.NLM_F_REQUEST)
	le.PutUint32(req[8:], seq)
	b := req[nlmsgHdrLen:]
	b[0] = unix.AF_UNIX
	le.PutUint32(b[4:], ^uint32(0)) // udiag_states: any
	le.PutUint32(b[8:], ino)
	le.PutUint32(b[12:], show)
	le.PutUint32(b[16:], ^uint32(0)) // udiag_cookie: INET_DIAG_NOCOOKIE
	le.PutUint32(b[20:], ^uint32(0))
	if err := unix.Sendto(nl, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, 0, err
	}
	buf := make([]byte, 8192)
	for {
		n, _, err := unix.Recvfrom(nl, buf, 0)
		if err != nil {
			return 0, 0, err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return 0, 0, err
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if e := int32(le.Uint32(m.Data)); e != 0 {
						return 0, 0, unix.Errno(-e)
					}
				}
				return 0, 0, errors.New("unix_diag: empty answer")
			case unix.SOCK_DIAG_BY_FAMILY:
				return parseUnixDiag(m.Data)
			}
		}
	}
}

// parseUnixDiag reads a unix_diag_msg and its attributes.
func parseUnixDiag(d []byte) (cookie uint64, peer uint32, err error) {
	if len(d) < unixDiagMsgLen {
		return 0, 0, errors.New("unix_diag: short answer")
	}
	le := binary.LittleEndian
	cookie = uint64(le.Uint32(d[8:])) | uint64(le.Uint32(d[12:]))<<32
	for a := d[unixDiagMsgLen:]; len(a) >= 4; {
		l := int(le.Uint16(a))
		if l < 4 || l > len(a) {
			break
		}
		if le.Uint16(a[2:]) == unixDiagPeer && l >= 8 {
			peer = le.Uint32(a[4:])
		}
		a = a[min((l+3)&^3, len(a)):]
	}
	return cookie, peer, nil
}
