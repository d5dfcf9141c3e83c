package pgstore

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmfa/pgmfa/mfa"
)

// Channel is the NOTIFY channel releases are announced on; the payload is
// the released ids, comma-separated.
const Channel = "pgmfa_release"

// PendingMaxAge bounds how long a waiting login's row is kept: longer than
// any sensible --mfa-timeout. Rows left by an instance that died are pruned
// after it (and never listed as waiting past it).
const PendingMaxAge = 30 * time.Minute

// Publish implements mfa.Fleet.
func (s *Store) Publish(p mfa.Pending) (uint64, []mfa.Pending, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	var id int64
	err := s.pool.QueryRow(ctx, `WITH old AS (DELETE FROM `+s.t("pending")+` WHERE since < $6)
		INSERT INTO `+s.t("pending")+` (instance, name, addr, database, app_name, since) VALUES ($1, $2, $3, $4, $5, $7) RETURNING id`,
		s.instance, p.User, p.Addr, p.Database, p.AppName, time.Now().Add(-PendingMaxAge), p.Since).Scan(&id)
	if err != nil {
		return 0, nil, s.wrap(err)
	}
	others, err := s.pending(ctx, `AND name = $2 AND id <> $3`, p.User, id)
	if err != nil {
		return 0, nil, err
	}
	return uint64(id), others, nil
}

// pending lists the waiting, unreleased logins matching extra (SQL after
// WHERE …, parameters from $2).
func (s *Store) pending(ctx context.Context, extra string, args ...any) ([]mfa.Pending, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, name, addr, database, app_name, since FROM `+s.t("pending")+`
		WHERE NOT released AND since >= $1 `+extra+` ORDER BY since, id`, append([]any{time.Now().Add(-PendingMaxAge)}, args...)...)
	if err != nil {
		return nil, s.wrap(err)
	}
	out, err := pgx.CollectRows(rows, scanPending)
	return out, s.wrap(err)
}

func scanPending(r pgx.CollectableRow) (mfa.Pending, error) {
	var p mfa.Pending
	var id int64
	err := r.Scan(&id, &p.User, &p.Addr, &p.Database, &p.AppName, &p.Since)
	p.ID = uint64(id)
	return p, err
}

// Withdraw implements mfa.Fleet.
func (s *Store) Withdraw(id uint64) error {
	ctx, cancel := s.ctx()
	defer cancel()
	_, err := s.pool.Exec(ctx, `DELETE FROM `+s.t("pending")+` WHERE id = $1`, int64(id))
	return s.wrap(err)
}

// ListPending implements mfa.Fleet.
func (s *Store) ListPending() ([]mfa.Pending, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	return s.pending(ctx, "")
}

// Release implements mfa.Fleet: one statement marks the rows and queues a
// notification; both take effect at its commit.
func (s *Store) Release(ids []uint64) ([]mfa.Pending, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	rows, err := s.pool.Query(ctx, `WITH r AS (
			UPDATE `+s.t("pending")+` SET released = true WHERE id = ANY($1) AND NOT released RETURNING id, name, addr, database, app_name, since
		), n AS (
			SELECT pg_notify($2, string_agg(id::text, ',')) FROM r HAVING count(*) > 0
		)
		SELECT r.*, (SELECT count(*) FROM n) FROM r`, toInt64(ids), Channel)
	if err != nil {
		return nil, s.wrap(err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (mfa.Pending, error) {
		var p mfa.Pending
		var id, n int64
		err := r.Scan(&id, &p.User, &p.Addr, &p.Database, &p.AppName, &p.Since, &n)
		p.ID = uint64(id)
		return p, err
	})
	return out, s.wrap(err)
}

// Released implements mfa.Fleet.
func (s *Store) Released(ids []uint64) ([]uint64, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT id FROM `+s.t("pending")+` WHERE id = ANY($1) AND released`, toInt64(ids))
	if err != nil {
		return nil, s.wrap(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, s.wrap(err)
	}
	out := make([]uint64, len(got))
	for i, id := range got {
		out[i] = uint64(id)
	}
	return out, nil
}

func toInt64(ids []uint64) []int64 {
	out := make([]int64, len(ids))
	for i, id := range ids {
		out[i] = int64(id)
	}
	return out
}

// Listen delivers the ids of every release in the fleet to notify until
// ctx ends. It holds one connection with LISTEN; when that connection is
// lost it reconnects (every second at most) and calls connected again, so
// the caller can ask for releases it may have missed (Approvals.Reconcile).
// Errors go to onErr, once per outage.
func (s *Store) Listen(ctx context.Context, notify func([]uint64), connected func(), onErr func(error)) {
	var lastErr string
	report := func(err error) {
		if err != nil && err.Error() != lastErr && ctx.Err() == nil {
			lastErr = err.Error()
			onErr(s.wrap(err))
		}
	}
	for ctx.Err() == nil {
		err := s.listenOnce(ctx, notify, func() { lastErr = ""; connected() })
		report(err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (s *Store) listenOnce(ctx context.Context, notify func([]uint64), connected func()) error {
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	conn, err := s.pool.Acquire(cctx)
	cancel()
	if err != nil {
		return err
	}
	// The connection is taken out of the pool for good: a LISTEN must not
	// be handed to another caller.
	c := conn.Hijack()
	defer c.Close(context.Background())
	if _, err := c.Exec(ctx, "LISTEN "+pgx.Identifier{Channel}.Sanitize()); err != nil {
		return err
	}
	connected()
	for {
		n, err := c.WaitForNotification(ctx)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		}
		var ids []uint64
		for _, f := range strings.Split(n.Payload, ",") {
			if id, err := strconv.ParseUint(f, 10, 64); err == nil {
				ids = append(ids, id)
			}
		}
		notify(ids)
	}
}
