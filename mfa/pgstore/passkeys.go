package pgstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmfa/pgmfa/mfa"
)

// Passkeys (mfa.PasskeyStore) live in the passkeys table, their data sealed
// like a TOTP secret (mfa.SealPasskeyData), and enrollment links in
// passkey_links, keyed by the token's SHA-256. Both reference their user
// with ON DELETE CASCADE, so removing an enrollment removes them. Every
// call is a statement or one transaction, so every instance sees a link
// the moment `pgmfa enroll --webauthn` commits it.

var _ mfa.PasskeyStore = (*Store)(nil)

// UserPasskeys implements mfa.PasskeyStore.
func (s *Store) UserPasskeys(user string) ([]mfa.Passkey, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT id, data, sign_count, created FROM `+s.t("passkeys")+` WHERE name = $1 ORDER BY created, id`, user)
	if err != nil {
		return nil, s.wrap(err)
	}
	type row struct {
		p    mfa.Passkey
		data string
	}
	recs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		var count int64
		err := r.Scan(&x.p.ID, &x.data, &count, &x.p.Created)
		x.p.SignCount = uint32(count)
		return x, err
	})
	if err != nil {
		return nil, s.wrap(err)
	}
	out := make([]mfa.Passkey, 0, len(recs))
	for _, r := range recs {
		if r.p.Data, err = s.openPasskey(user, r.data); err != nil {
			return nil, err
		}
		out = append(out, r.p)
	}
	return out, nil
}

// openPasskey opens a passkey's stored data, naming the store and user in
// the error.
func (s *Store) openPasskey(user, stored string) ([]byte, error) {
	data, _, err := mfa.OpenPasskeyData(s.keys(), user, stored)
	if err != nil {
		return nil, fmt.Errorf("store %s: a passkey of user %q: %w", s.conn, user, err)
	}
	return data, nil
}

// PasskeyByID implements mfa.PasskeyStore.
func (s *Store) PasskeyByID(id []byte) (string, mfa.Passkey, bool, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	p := mfa.Passkey{ID: id}
	var user, data string
	var count int64
	err := s.pool.QueryRow(ctx, `SELECT name, data, sign_count, created FROM `+s.t("passkeys")+` WHERE id = $1`, id).
		Scan(&user, &data, &count, &p.Created)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", mfa.Passkey{}, false, nil
	}
	if err != nil {
		return "", mfa.Passkey{}, false, s.wrap(err)
	}
	p.SignCount = uint32(count)
	if p.Data, err = s.openPasskey(user, data); err != nil {
		return "", mfa.Passkey{}, false, err
	}
	return user, p, true, nil
}

// AddPasskeyLink implements mfa.PasskeyStore. In the same statement it
// deletes links that expired or were used: nothing reads them again.
func (s *Store) AddPasskeyLink(user string, tokenHash []byte, expires time.Time) error {
	if len(tokenHash) != 32 {
		return fmt.Errorf("an enrollment link's token hash is a SHA-256 (32 bytes), got %d bytes", len(tokenHash))
	}
	ctx, cancel := s.ctx()
	defer cancel()
	tag, err := s.pool.Exec(ctx, `WITH old AS (DELETE FROM `+s.t("passkey_links")+` WHERE used OR expires <= now())
		INSERT INTO `+s.t("passkey_links")+` (token_hash, name, expires)
		SELECT $1, name, $3 FROM `+s.t("users")+` WHERE name = $2`, tokenHash, user, expires)
	if err != nil {
		return s.wrap(err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("user %q: %w", user, mfa.ErrNotEnrolled)
	}
	return nil
}

// PasskeyLink implements mfa.PasskeyStore.
func (s *Store) PasskeyLink(tokenHash []byte, now time.Time) (string, bool, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	var user string
	err := s.pool.QueryRow(ctx, `SELECT name FROM `+s.t("passkey_links")+` WHERE token_hash = $1 AND NOT used AND expires > $2`, tokenHash, now).Scan(&user)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	}
	if err != nil {
		return "", false, s.wrap(err)
	}
	return user, true, nil
}

// EnrollPasskey implements mfa.PasskeyStore in one transaction: a
// conditional UPDATE claims the link (of two claims, the second waits for
// the first and then finds the link used), an advisory lock on the user
// keeps two links of one user from passing the limit together, and the
// insert stores the passkey. Any refusal rolls the claim back, so the link
// stays usable. A zero p.Created is set to now.
func (s *Store) EnrollPasskey(tokenHash []byte, now time.Time, p mfa.Passkey) (string, error) {
	if err := p.Check(); err != nil {
		return "", err
	}
	if p.Created.IsZero() {
		p.Created = now
	}
	ctx, cancel := s.ctx()
	defer cancel()
	var user string
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `UPDATE `+s.t("passkey_links")+` SET used = true
			WHERE token_hash = $1 AND NOT used AND expires > $2 RETURNING name`, tokenHash, now).Scan(&user)
		if errors.Is(err, pgx.ErrNoRows) {
			return mfa.ErrLinkInvalid
		}
		if err != nil {
			return s.wrap(err)
		}
		// The lock first, the count in a statement of its own: under READ
		// COMMITTED its snapshot then includes what the lock waited for.
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('pgmfa passkeys'), hashtext($1))`, s.schema+"."+user); err != nil {
			return s.wrap(err)
		}
		var n int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM `+s.t("passkeys")+` WHERE name = $1`, user).Scan(&n); err != nil {
			return s.wrap(err)
		}
		if n >= mfa.MaxPasskeysPerUser {
			return fmt.Errorf("user %q has %d passkeys, the most one user may register; remove them with pgmfa enroll --remove --webauthn %s", user, n, user)
		}
		data, err := mfa.SealPasskeyData(s.keys(), user, p.Data)
		if err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `INSERT INTO `+s.t("passkeys")+` (id, name, data, key_id, sign_count, created)
			VALUES ($1, $2, $3, NULLIF($4, ''), $5, $6) ON CONFLICT (id) DO NOTHING`,
			p.ID, user, data, s.keys().CurrentID(), int64(p.SignCount), p.Created)
		if err != nil {
			return s.wrap(err)
		}
		if tag.RowsAffected() == 0 {
			return mfa.ErrPasskeyExists
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return user, nil
}

// SetSignCount implements mfa.PasskeyStore with one conditional UPDATE.
func (s *Store) SetSignCount(id []byte, old, new uint32) (bool, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	tag, err := s.pool.Exec(ctx, `UPDATE `+s.t("passkeys")+` SET sign_count = $3 WHERE id = $1 AND sign_count = $2`, id, int64(old), int64(new))
	if err != nil {
		return false, s.wrap(err)
	}
	return tag.RowsAffected() == 1, nil
}

// RemovePasskeys implements mfa.PasskeyStore.
func (s *Store) RemovePasskeys(user string) (int, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	tag, err := s.pool.Exec(ctx, `WITH l AS (DELETE FROM `+s.t("passkey_links")+` WHERE name = $1)
		DELETE FROM `+s.t("passkeys")+` WHERE name = $1`, user)
	if err != nil {
		return 0, s.wrap(err)
	}
	return int(tag.RowsAffected()), nil
}

// resealPasskeys re-seals every passkey's data under the current key,
// inside Reseal's transaction.
func (s *Store) resealPasskeys(ctx context.Context, tx pgx.Tx) error {
	rows, err := tx.Query(ctx, `SELECT id, name, data FROM `+s.t("passkeys")+` ORDER BY id FOR UPDATE`)
	if err != nil {
		return s.wrap(err)
	}
	type row struct {
		id         []byte
		name, data string
	}
	recs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		return x, r.Scan(&x.id, &x.name, &x.data)
	})
	if err != nil {
		return s.wrap(err)
	}
	for _, r := range recs {
		data, err := s.openPasskey(r.name, r.data)
		if err != nil {
			return fmt.Errorf("%w; nothing was re-encrypted", err)
		}
		sealed, err := mfa.SealPasskeyData(s.keys(), r.name, data)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE `+s.t("passkeys")+` SET data = $2, key_id = $3 WHERE id = $1`, r.id, sealed, s.keys().CurrentID()); err != nil {
			return s.wrap(err)
		}
	}
	return nil
}

// ImportPasskeys writes passkeys of enrolled users in one transaction
// (`pgmfa store migrate`, after Import). A credential id already in the
// store, or a user not in it, fails the whole import and nothing is
// written. It returns how many it wrote.
func (s *Store) ImportPasskeys(pks map[string][]mfa.Passkey) (int, error) {
	n := 0
	for _, ps := range pks {
		n += len(ps)
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout+time.Duration(n)*10*time.Millisecond)
	defer cancel()
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		for user, ps := range pks {
			for _, p := range ps {
				if err := p.Check(); err != nil {
					return fmt.Errorf("a passkey of user %q: %w", user, err)
				}
				data, err := mfa.SealPasskeyData(s.keys(), user, p.Data)
				if err != nil {
					return err
				}
				tag, err := tx.Exec(ctx, `INSERT INTO `+s.t("passkeys")+` (id, name, data, key_id, sign_count, created)
					SELECT $1, name, $3, NULLIF($4, ''), $5, $6 FROM `+s.t("users")+` WHERE name = $2
					ON CONFLICT (id) DO NOTHING`,
					p.ID, user, data, s.keys().CurrentID(), int64(p.SignCount), p.Created)
				if err != nil {
					return s.wrap(err)
				}
				if tag.RowsAffected() == 0 {
					return fmt.Errorf("a passkey of user %q: the user is not in the store %s, or the passkey is already there; no passkey was copied", user, s.conn)
				}
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}
