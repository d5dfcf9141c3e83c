package main

import (
	"context"
	"fmt"
	"io"
	"sync/atomic"
	"time"
)

// Bytes per generated row on the wire, roughly: a 100-byte text column plus
// the row number, framed as CopyData or DataRow. Only used to size the
// queries; the figure reported is the bytes actually received.
const (
	copyRowBytes   = 108
	selectRowBytes = 122
)

// bulk streams a large result through ep and returns MB/s (10^6 bytes per
// second, counted on the client socket, login excluded). copyOut selects
// COPY TO STDOUT of -bulk-mb, else a plain SELECT of 3/5 of it.
func (e *env) bulk(ctx context.Context, ep *endpoint, copyOut bool) (float64, map[string]float64, error) {
	var rx atomic.Int64
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	conn, err := connect(ctx, ep, benchUser, true, &rx, nil)
	if err != nil {
		return 0, nil, fmt.Errorf("login: %w", err)
	}
	defer conn.Close(context.Background())
	target := int64(e.cfg.BulkMB) * 1_000_000
	gen := "SELECT i, repeat('x', 100) FROM generate_series(1, %d) AS i"
	start := rx.Load()
	t0 := time.Now()
	if copyOut {
		_, err = conn.CopyTo(ctx, io.Discard, fmt.Sprintf("COPY ("+gen+") TO STDOUT", target/copyRowBytes))
	} else {
		rows := target * 3 / 5 / selectRowBytes
		mrr := conn.Exec(ctx, fmt.Sprintf(gen, rows))
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
	}
	secs := time.Since(t0).Seconds()
	if err != nil {
		return 0, nil, err
	}
	n := rx.Load() - start
	return float64(n) / 1e6 / secs, map[string]float64{"bytes": float64(n), "seconds": secs}, nil
}
