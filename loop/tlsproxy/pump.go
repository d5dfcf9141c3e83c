package tlsproxy

import (
	"bytes"
	"errors"
	"io"
	"net"
)

// relayBuf is each direction's buffer. A TLS record carries at most 16 KiB
// of plaintext, so larger buffers would rarely fill from a TLS side.
const relayBuf = 32 << 10

// pump reads one socket for the whole life of the session. During the
// login it hands every read to the login goroutine; once relay is closed it
// writes what it reads straight to the other side, as io.Copy would.
// c2s says which direction it is: client to server, or server to client.
//
// A read that was in flight at the release is not lost: the pump finds the
// login goroutine gone (relay closed) and writes it on itself, after the
// login goroutine wrote everything it held (close(relay) orders the two).
func (s *sess) pump(src net.Conn, in chan<- chunk, c2s bool) {
	buf := make([]byte, relayBuf)
	relaying := false
	for {
		n, err := src.Read(buf)
		if !relaying {
			select {
			case in <- chunk{data: bytes.Clone(buf[:n]), err: err}:
				if err != nil {
					return
				}
				continue
			case <-s.relay:
				relaying = true
			case <-s.quit:
				return
			}
		}
		if n > 0 {
			dst, count := s.client, &s.s2c
			if c2s {
				dst, count = s.up, &s.c2s
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				s.endDirection(c2s, werr, true)
				return
			}
			count.Add(uint64(n))
		}
		if err != nil {
			s.endDirection(c2s, err, false)
			return
		}
	}
}

// endDirection passes the end of one direction on. The client's end of
// stream becomes a half-close towards the database (which then ends the
// session itself, after sending what it still had); the database's end
// ends the session: nothing the client sends later could be delivered.
// Errors close both sides.
func (s *sess) endDirection(c2s bool, err error, onWrite bool) {
	eof := !onWrite && errors.Is(err, io.EOF)
	switch {
	case c2s && eof:
		s.setReason("client closed")
		closeWrite(s.up)
		return // the database ends the session when it has said everything
	case c2s:
		s.setReason(sideErr(onWrite, "database", "client", err))
	case eof:
		s.setReason("database closed")
		closeWrite(s.client)
	default:
		s.setReason(sideErr(onWrite, "client", "database", err))
	}
	s.abort("")
}

// sideErr words a relay error: a failed write names the destination, a
// failed read the source.
func sideErr(onWrite bool, dst, src string, err error) string {
	if onWrite {
		return "write to " + dst + ": " + err.Error()
	}
	return "read from " + src + ": " + err.Error()
}
