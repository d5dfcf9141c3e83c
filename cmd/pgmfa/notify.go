package main

import (
	"fmt"
	"net"
	"os"
)

// sdNotify sends state (for example "READY=1") to the service manager's
// notification socket, $NOTIFY_SOCKET: a unix datagram socket, a path or an
// abstract name starting with '@' (sd_notify(3)). Without the variable it
// does nothing: pgmfa was not started by systemd with Type=notify.
func sdNotify(state string) error {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return nil
	}
	if name[0] != '/' && name[0] != '@' {
		return fmt.Errorf("NOTIFY_SOCKET=%q: want a path or an abstract socket (@name)", name)
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("NOTIFY_SOCKET: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("NOTIFY_SOCKET: %w", err)
	}
	return nil
}
