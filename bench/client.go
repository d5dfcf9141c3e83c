package main

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"

	"github.com/jackc/pgx/v5/pgconn"
)

// connect logs in to ep as user (with the path's MFA code when it has MFA)
// through pgconn, counting the bytes the client receives in rx when not nil.
// local, when set, is the client's source address.
func connect(ctx context.Context, ep *endpoint, user string, withCode bool, rx *atomic.Int64, local net.Addr) (*pgconn.PgConn, error) {
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
		if err != nil || rx == nil {
			return c, err
		}
		return &countingConn{Conn: c, rx: rx}, nil
	}
	return pgconn.ConnectConfig(ctx, cfg)
}

// countingConn counts bytes read: what the server (through the path) sent.
type countingConn struct {
	net.Conn
	rx *atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.rx.Add(int64(n))
	return n, err
}
