package main

import (
	"context"
	"crypto/md5"
	"encoding/binary"
	"fmt"
	"io"
	"math/big"
	"math/bits"
	"strconv"

	"github.com/jackc/pgx/v5/pgconn"
)

// copyInTable is the copy-in workload's target: UNLOGGED (no WAL, so the
// figure is the path and the parser, not the disk) and without autovacuum
// (which would otherwise start on the loaded table while the next path is
// measured). Created at setup, owned by the bench user, emptied with
// TRUNCATE before and after every measurement.
const copyInTable = "bench_copyin"

// copyInDDL creates copyInTable; it runs as the superuser at setup.
const copyInDDL = "CREATE UNLOGGED TABLE " + copyInTable + " (i bigint NOT NULL, t text NOT NULL) WITH (autovacuum_enabled = off);\n" +
	"ALTER TABLE " + copyInTable + " OWNER TO " + benchUser + ";\n"

// copyInTextLen is the length of each row's text column; the row number,
// a tab and a newline make a row about copyRowBytes on the wire.
const copyInTextLen = 100

// copyInAlphabet holds the text column's characters: 64 of them, none
// special to COPY's text format.
const copyInAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

// copyInCheckSQL sums over the loaded rows what copyInChecksum sums over the
// generated ones: the first 60 bits of md5("<i>:<t>") of every row.
const copyInCheckSQL = "SELECT count(*), coalesce(sum(('x' || left(md5(i::text || ':' || t), 15))::bit(60)::bigint), 0)::text FROM " + copyInTable

// appendCopyInRow appends row i in COPY text format: i, a tab, 100
// characters that only depend on i (splitmix64 seeded with i), a newline.
func appendCopyInRow(b []byte, i int64) []byte {
	b = strconv.AppendInt(b, i, 10)
	b = append(b, '\t')
	x := uint64(i) << 32
	for k := 0; k < copyInTextLen; k += 10 {
		r := splitmix64(&x)
		for j := 0; j < 10; j++ {
			b = append(b, copyInAlphabet[r&63])
			r >>= 6
		}
	}
	return append(b, '\n')
}

func splitmix64(x *uint64) uint64 {
	*x += 0x9e3779b97f4a7c15
	z := *x
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}

// copyInReader streams rows next..last as COPY FROM STDIN text.
type copyInReader struct {
	next, last int64
	buf        []byte
	off        int
}

func newCopyInReader(rows int64) *copyInReader {
	return &copyInReader{next: 1, last: rows, buf: make([]byte, 0, 64<<10+2*copyRowBytes)}
}

func (r *copyInReader) Read(p []byte) (int, error) {
	for r.off == len(r.buf) {
		if r.next > r.last {
			return 0, io.EOF
		}
		r.buf, r.off = r.buf[:0], 0
		for r.next <= r.last && len(r.buf) < 64<<10 {
			r.buf = appendCopyInRow(r.buf, r.next)
			r.next++
		}
	}
	n := copy(p, r.buf[r.off:])
	r.off += n
	return n, nil
}

// copyInChecksum is what copyInCheckSQL returns for rows 1..rows loaded
// intact: the decimal sum of the first 60 bits of md5("<i>:<t>") per row.
func copyInChecksum(rows int64) string {
	var hi, lo uint64
	var line []byte
	for i := int64(1); i <= rows; i++ {
		line = appendCopyInRow(line[:0], i)
		tab := len(line) - copyInTextLen - 2
		line[tab] = ':'
		d := md5.Sum(line[:len(line)-1])
		var c uint64
		lo, c = bits.Add64(lo, binary.BigEndian.Uint64(d[:8])>>4, 0)
		hi += c
	}
	s := new(big.Int).Lsh(new(big.Int).SetUint64(hi), 64)
	return s.Or(s, new(big.Int).SetUint64(lo)).String()
}

// copyIn loads -bulk-mb MB of generated rows with COPY FROM STDIN and
// returns MB/s sent by the client, from the COPY to its CommandComplete
// (the database has every row). The table is emptied before and after;
// afterwards the row count and checksum must match what was sent, so a path
// that loses or mangles bytes fails instead of reporting a fast figure.
func (e *env) copyIn(ctx context.Context, ep *endpoint) (float64, map[string]float64, error) {
	rows := int64(e.cfg.BulkMB) * 1_000_000 / copyRowBytes
	want, ok := e.copyInSums[rows]
	if !ok {
		// Once per run, and outside the timing: the client's CPU is shared.
		want = copyInChecksum(rows)
		if e.copyInSums == nil {
			e.copyInSums = map[int64]string{}
		}
		e.copyInSums[rows] = want
		e.copyInWarmup(ctx, rows)
	}
	var tag pgconn.CommandTag
	v, detail, err := e.measureTransfer(ctx, ep, transfer{
		upload:  true,
		prepare: truncateCopyIn,
		run: func(ctx context.Context, c *pgconn.PgConn) (err error) {
			tag, err = loadCopyIn(ctx, c, rows)
			return err
		},
		check: func(ctx context.Context, c *pgconn.PgConn) error {
			res, err := c.Exec(ctx, copyInCheckSQL).ReadAll()
			if err != nil {
				return err
			}
			if len(res) != 1 || len(res[0].Rows) != 1 || len(res[0].Rows[0]) != 2 {
				return fmt.Errorf("unexpected result of the check query")
			}
			if err := checkCopyIn(rows, want, tag.RowsAffected(), string(res[0].Rows[0][0]), string(res[0].Rows[0][1])); err != nil {
				return err
			}
			return truncateCopyIn(ctx, c)
		},
	})
	if err == nil {
		detail["rows"] = float64(rows)
	}
	return v, detail, err
}

// loadCopyIn sends rows 1..rows to copyInTable with COPY FROM STDIN.
func loadCopyIn(ctx context.Context, c *pgconn.PgConn, rows int64) (pgconn.CommandTag, error) {
	return c.CopyFrom(ctx, newCopyInReader(rows), "COPY "+copyInTable+" (i, t) FROM STDIN")
}

// truncateCopyIn empties copyInTable.
func truncateCopyIn(ctx context.Context, c *pgconn.PgConn) error {
	// A session a path ended may still hold its backend's lock a moment.
	return c.Exec(ctx, "SET lock_timeout = '1min'; TRUNCATE "+copyInTable).Close()
}

// copyInWarmup loads the table once, untimed, straight to the database,
// before the run's first copy-in: the first load after PostgreSQL starts
// came out a third slower than later ones (table files, page cache, the
// VM's first touch of memory), a penalty that fell on whichever path the
// round measured first. A failure is logged only; the measurement that
// follows reports its own.
func (e *env) copyInWarmup(ctx context.Context, rows int64) {
	ctx, cancel := context.WithTimeout(ctx, bulkTimeout)
	defer cancel()
	direct := &endpoint{Name: pathDirect, Host: e.cluster.Host, Port: e.cluster.Port}
	c, err := connect(ctx, direct, benchUser, false, nil, nil)
	if err == nil {
		defer c.Close(context.Background())
		if err = truncateCopyIn(ctx, c); err == nil {
			if _, err = loadCopyIn(ctx, c, rows); err == nil {
				err = truncateCopyIn(ctx, c)
			}
		}
	}
	if err != nil {
		e.logf("copy-in warm-up load: %v", err)
	}
}

// checkCopyIn compares a load with what was sent: the COPY's row count, the
// table's row count and its checksum.
func checkCopyIn(rows int64, wantSum string, copied int64, count, sum string) error {
	if copied != rows {
		return fmt.Errorf("COPY reported %d rows, %d sent", copied, rows)
	}
	if count != strconv.FormatInt(rows, 10) {
		return fmt.Errorf("table holds %s rows, %d sent", count, rows)
	}
	if sum != wantSum {
		return fmt.Errorf("checksum of the loaded rows %s, of the sent rows %s: rows arrived altered", sum, wantSum)
	}
	return nil
}
