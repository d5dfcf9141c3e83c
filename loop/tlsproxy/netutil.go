package tlsproxy

import (
	"crypto/tls"
	"net"
	"os"
)

// prefixConn replays bytes the loop (or the login machine) already read
// before reading the socket: the start of a ClientHello that arrived with
// the first packet, or TLS bytes the loop read after its 'S'.
type prefixConn struct {
	net.Conn
	prefix []byte
}

var _ net.Conn = (*prefixConn)(nil)

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// rawConn is the socket under a connection (the TCP or unix socket under a
// tls.Conn), for closes that must not wait for a TLS alert to be written.
func rawConn(c net.Conn) net.Conn {
	for {
		switch t := c.(type) {
		case *tls.Conn:
			c = t.NetConn()
		case *prefixConn:
			c = t.Conn
		default:
			return c
		}
	}
}

type closeWriter interface{ CloseWrite() error }

// closeWrite passes an end of stream on: close_notify for TLS (which
// tls.Conn.CloseWrite sends but does not follow with a FIN), then a FIN on
// the socket, so the peer sees EOF either way.
func closeWrite(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		_ = tc.CloseWrite()
	}
	if cw, ok := rawConn(c).(closeWriter); ok {
		_ = cw.CloseWrite()
	}
}

func isTLS(c net.Conn) bool {
	_, ok := c.(*tls.Conn)
	return ok
}

// FileConn turns a socket descriptor into a net.Conn for Handoff.Conn (for
// example the Dup of a gnet connection that package loop hands over). It
// takes ownership of fd: fd is closed, the returned conn holds its own
// duplicate, registered with Go's network poller.
func FileConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "pgmfa-socket")
	defer f.Close()
	return net.FileConn(f)
}
