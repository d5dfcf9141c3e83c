package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Bytes per generated row on the wire, roughly: a 100-byte text column plus
// the row number, framed as CopyData or DataRow. Only used to size the
// queries; the figure reported is the bytes actually counted on the socket.
const (
	copyRowBytes   = 108
	selectRowBytes = 122
)

// bulkGen is the query the download workloads read; %d is the row count.
const bulkGen = "SELECT i, repeat('x', 100) FROM generate_series(1, %d) AS i"

// bulkTimeout bounds one bulk measurement, login to check.
const bulkTimeout = 10 * time.Minute

// transfer is one bulk measurement on a fresh login. prepare and check run
// untimed before and after run; the figure is the bytes counted on the
// client socket while run ran, sent by the client when upload is set,
// received otherwise.
type transfer struct {
	upload  bool
	prepare func(ctx context.Context, c *pgconn.PgConn) error
	run     func(ctx context.Context, c *pgconn.PgConn) error
	check   func(ctx context.Context, c *pgconn.PgConn) error
}

// measureTransfer runs t through ep and returns MB/s (10^6 bytes per
// second, login excluded). On a pgmfa path an error is prefixed with the
// reason pgmfa logged for ending the session, when it ended it: an upload
// that outruns the database on a spliced session is ended at the kernel
// backlog bound, and the client only sees a broken connection.
func (e *env) measureTransfer(ctx context.Context, ep *endpoint, t transfer) (float64, map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, bulkTimeout)
	defer cancel()
	var tr traffic
	conn, err := connect(ctx, ep, benchUser, true, &tr, nil)
	if err != nil {
		return 0, nil, fmt.Errorf("login: %w", err)
	}
	defer conn.Close(context.Background())
	ended := sessionEndWatch(ep, conn)
	fail := func(stage string, err error) (float64, map[string]float64, error) {
		if reason := ended(); reason != "" {
			return 0, nil, fmt.Errorf("%s: session ended by pgmfa, reason %q: %w", stage, reason, err)
		}
		return 0, nil, fmt.Errorf("%s: %w", stage, err)
	}
	if t.prepare != nil {
		if err := t.prepare(ctx, conn); err != nil {
			return fail("preparation", err)
		}
	}
	counter := &tr.rx
	if t.upload {
		counter = &tr.tx
	}
	start := counter.Load()
	t0 := time.Now()
	err = t.run(ctx, conn)
	secs := time.Since(t0).Seconds()
	n := counter.Load() - start
	if err != nil {
		return fail("transfer", err)
	}
	if t.check != nil {
		if err := t.check(ctx, conn); err != nil {
			return fail("check", err)
		}
	}
	return float64(n) / 1e6 / secs, map[string]float64{"bytes": float64(n), "seconds": secs}, nil
}

// copyOut reads COPY TO STDOUT of -bulk-mb MB.
func (e *env) copyOut(ctx context.Context, ep *endpoint) (float64, map[string]float64, error) {
	rows := int64(e.cfg.BulkMB) * 1_000_000 / copyRowBytes
	return e.measureTransfer(ctx, ep, transfer{
		run: func(ctx context.Context, c *pgconn.PgConn) error {
			_, err := c.CopyTo(ctx, io.Discard, fmt.Sprintf("COPY ("+bulkGen+") TO STDOUT", rows))
			return err
		}})
}

// selectBulk reads a plain SELECT of 3/5 of -bulk-mb MB.
func (e *env) selectBulk(ctx context.Context, ep *endpoint) (float64, map[string]float64, error) {
	rows := int64(e.cfg.BulkMB) * 1_000_000 * 3 / 5 / selectRowBytes
	return e.measureTransfer(ctx, ep, transfer{
		run: func(ctx context.Context, c *pgconn.PgConn) error {
			// Row by row: ReadAll would hold the whole result in memory.
			mrr := c.Exec(ctx, fmt.Sprintf(bulkGen, rows))
			var err error
			for mrr.NextResult() {
				rr := mrr.ResultReader()
				for rr.NextRow() {
				}
				if _, err = rr.Close(); err != nil {
					break
				}
			}
			if cerr := mrr.Close(); err == nil {
				err = cerr
			}
			return err
		}})
}
