package main

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"

	"github.com/jackc/pgx/v5/pgconn"
)

// connect logs in to ep as user (with the path's MFA code when it has MFA)
// through pgconn, counting the bytes on the client socket in tr when not
// nil. local, when set, is the client's source address.
func connect(ctx context.Context, ep *endpoint, user string, withCode bool, tr *traffic, local net.Addr) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(fmt.Sprintf("host=%s port=%d user=%s password=%s dbname=%s sslmode=%s application_name=pgmfa-bench",
		ep.Host, ep.Port, user, benchPassword, benchDB, ep.sslmode()))
	if err != nil {
		return nil, err
	}
	if withCode {
		opts, err := ep.options(user)
		if err != nil {
			return nil, err
		}
		if opts != "" {
			cfg.RuntimeParams["options"] = opts
		}
	}
	d := &net.Dialer{LocalAddr: local}
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil || tr == nil {
			return c, err
		}
		return &countingConn{Conn: c, tr: tr}, nil
	}
	return pgconn.ConnectConfig(ctx, cfg)
}

// traffic counts the bytes on a client socket, protocol framing included:
// rx what the server (through the path) sent, tx what the client sent.
type traffic struct {
	rx, tx atomic.Int64
}

// countingConn counts a connection's bytes in a traffic.
type countingConn struct {
	net.Conn
	tr *traffic
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.tr.rx.Add(int64(n))
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.tr.tx.Add(int64(n))
	return n, err
}
