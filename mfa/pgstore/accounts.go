package pgstore

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/pgmfa/pgmfa/mfa"
)

// The accounts of --auth accounts (see mfa/accounts.go), in the accounts
// and account_secret tables, sealed as in the file store.

// AddAccount stores a new account (mfa.ErrAccountExists if it exists),
// creating the secret behind unknown accounts' salts with the first one.
func (s *Store) AddAccount(name string, rec mfa.AccountRecord) error {
	if err := mfa.ValidAccountName(name); err != nil {
		return err
	}
	if rec.Role == "" {
		return errors.New("empty database role")
	}
	v, pw, err := mfa.SealAccount(s.keys(), name, rec)
	if err != nil {
		return err
	}
	secret, err := mfa.NewAccountSecret()
	if err != nil {
		return err
	}
	sealedSecret, err := mfa.SealAccountSecret(s.keys(), secret)
	if err != nil {
		return err
	}
	ctx, cancel := s.ctx()
	defer cancel()
	return s.wrap(pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO `+s.t("account_secret")+` (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING`, sealedSecret); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `INSERT INTO `+s.t("accounts")+` (name, verifier, role, db_password) VALUES ($1, $2, $3, $4)
			ON CONFLICT (name) DO NOTHING`, name, v, rec.Role, pw)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("account %q: %w", name, mfa.ErrAccountExists)
		}
		return nil
	}))
}

// SetAccountVerifier replaces an account's verifier.
func (s *Store) SetAccountVerifier(name, verifier string) error {
	v, _, err := mfa.SealAccount(s.keys(), name, mfa.AccountRecord{Verifier: verifier})
	if err != nil {
		return err
	}
	ctx, cancel := s.ctx()
	defer cancel()
	tag, err := s.pool.Exec(ctx, `UPDATE `+s.t("accounts")+` SET verifier = $2 WHERE name = $1`, name, v)
	if err != nil {
		return s.wrap(err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("account %q: %w", name, mfa.ErrNoAccount)
	}
	return nil
}

// RemoveAccount deletes an account.
func (s *Store) RemoveAccount(name string) error {
	ctx, cancel := s.ctx()
	defer cancel()
	tag, err := s.pool.Exec(ctx, `DELETE FROM `+s.t("accounts")+` WHERE name = $1`, name)
	if err != nil {
		return s.wrap(err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("account %q: %w", name, mfa.ErrNoAccount)
	}
	return nil
}

// ListAccounts returns the accounts' names, sorted.
func (s *Store) ListAccounts() ([]string, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT name FROM `+s.t("accounts")+` ORDER BY name`)
	if err != nil {
		return nil, s.wrap(err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	return names, s.wrap(err)
}

// GetAccount reads and opens one account.
func (s *Store) GetAccount(name string) (mfa.AccountRecord, bool, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	var v, role, pw string
	var rec mfa.AccountRecord
	err := s.pool.QueryRow(ctx, `SELECT verifier, role, db_password, created FROM `+s.t("accounts")+` WHERE name = $1`, name).
		Scan(&v, &role, &pw, &rec.Created)
	if errors.Is(err, pgx.ErrNoRows) {
		return rec, false, nil
	}
	if err != nil {
		return rec, false, s.wrap(err)
	}
	created := rec.Created
	if rec, err = mfa.OpenAccount(s.keys(), name, v, role, pw); err != nil {
		return rec, false, err
	}
	rec.Created = created
	return rec, true, nil
}

// AccountsSecret is the secret behind unknown accounts' salts (nil before
// the first account).
func (s *Store) AccountsSecret() ([]byte, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	var sealed string
	err := s.pool.QueryRow(ctx, `SELECT secret FROM `+s.t("account_secret")+` WHERE id = 1`).Scan(&sealed)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, s.wrap(err)
	}
	return mfa.OpenAccountSecret(s.keys(), sealed)
}

// resealAccounts re-seals every account and the account secret under the
// current key, inside Reseal's transaction.
func (s *Store) resealAccounts(ctx context.Context, tx pgx.Tx) (int, error) {
	rows, err := tx.Query(ctx, `SELECT name, verifier, role, db_password FROM `+s.t("accounts")+` ORDER BY name FOR UPDATE`)
	if err != nil {
		return 0, s.wrap(err)
	}
	type row struct{ name, v, role, pw string }
	recs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		return x, r.Scan(&x.name, &x.v, &x.role, &x.pw)
	})
	if err != nil {
		return 0, s.wrap(err)
	}
	for _, r := range recs {
		rec, err := mfa.OpenAccount(s.keys(), r.name, r.v, r.role, r.pw)
		if err != nil {
			return 0, fmt.Errorf("%w; nothing was re-encrypted", err)
		}
		v, pw, err := mfa.SealAccount(s.keys(), r.name, rec)
		if err != nil {
			return 0, err
		}
		if _, err := tx.Exec(ctx, `UPDATE `+s.t("accounts")+` SET verifier = $2, db_password = $3 WHERE name = $1`, r.name, v, pw); err != nil {
			return 0, s.wrap(err)
		}
	}
	var sealed string
	err = tx.QueryRow(ctx, `SELECT secret FROM `+s.t("account_secret")+` WHERE id = 1 FOR UPDATE`).Scan(&sealed)
	if errors.Is(err, pgx.ErrNoRows) {
		return len(recs), nil
	}
	if err != nil {
		return 0, s.wrap(err)
	}
	secret, err := mfa.OpenAccountSecret(s.keys(), sealed)
	if err != nil {
		return 0, err
	}
	if sealed, err = mfa.SealAccountSecret(s.keys(), secret); err != nil {
		return 0, err
	}
	_, err = tx.Exec(ctx, `UPDATE `+s.t("account_secret")+` SET secret = $1 WHERE id = 1`, sealed)
	return len(recs), s.wrap(err)
}
