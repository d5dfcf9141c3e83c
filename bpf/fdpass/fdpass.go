// Package fdpass carries bytes and file descriptors over a unix stream
// socket (SCM_RIGHTS), for the two protocols that move a running pgmfa's
// sockets to its successor: the kernel hand-over of spliced sessions
// (package bpf) and the takeover around it (package loop). Each protocol
// keeps its own framing; this is what they share: sending a frame with
// its descriptors, taking descriptors out of received control data,
// closing them, and decoding a frame's JSON strictly.
package fdpass

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"

	"golang.org/x/sys/unix"
)

// Send writes b with fds attached to its first byte (in the same sendmsg,
// so they arrive with it). A stream socket may take a long b in parts;
// the rest follows without descriptors.
func Send(conn *net.UnixConn, b []byte, fds []int) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, _, err := conn.WriteMsgUnix(b, oob, nil)
	if err == nil && n < len(b) {
		_, err = conn.Write(b[n:])
	}
	return err
}

// Rights returns the descriptors in received control data, or an error
// (and none) when the control data does not parse.
func Rights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	var fds []int
	for _, m := range msgs {
		if f, err := unix.ParseUnixRights(&m); err == nil {
			fds = append(fds, f...)
		}
	}
	return fds, err
}

// CloseAll closes fds.
func CloseAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// StrictJSON decodes b, one JSON value, into v: no unknown field, nothing
// after it.
func StrictJSON(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return err
	}
	if d.More() {
		return errors.New("trailing data after the JSON value")
	}
	return nil
}
