// Package pgstore keeps pgmfa's MFA state in PostgreSQL, so that every
// instance of a fleet shares it: the enrollments (secrets sealed with the
// store key), the last accepted time step per user (single use, claimed with
// one conditional UPDATE), the failure counters behind throttling, the
// --mfa-remember grants, the logins waiting for approval, and the passkeys
// with their enrollment links (passkeys.go).
//
// Everything lives in its own schema (default "pgmfa"), created and
// upgraded by Init (`pgmfa store init`) with numbered migrations under an
// advisory lock. The role a running proxy uses needs only the privileges
// Init's grant gives (see GrantSQL); it owns nothing and creates nothing.
//
// Every call has a deadline (Options.Timeout): an unreachable database
// fails the call, never hangs it, and the pool reconnects on its own when
// the database is back.
package pgstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pquerna/otp"

	"github.com/pgmfa/pgmfa/mfa"
)

// DefaultSchema is the schema the store lives in.
const DefaultSchema = "pgmfa"

// DefaultTimeout bounds every store call.
const DefaultTimeout = 3 * time.Second

// Options of Open.
type Options struct {
	Keys    *mfa.Keyring  // seals new secrets, opens stored ones; nil: plaintext
	Schema  string        // DefaultSchema when empty
	Timeout time.Duration // DefaultTimeout when 0
	// Instance names this process in the waiting-logins table (approvals
	// across the fleet); empty: host name and pid.
	Instance string
}

// Store is the PostgreSQL store. It implements mfa.Secrets, mfa.Accounts,
// mfa.AccountLoader, mfa.StepClaimer, mfa.Shared and mfa.PasskeyStore.
// Safe for concurrent use.
type Store struct {
	pool     *pgxpool.Pool
	keyring  atomic.Pointer[mfa.Keyring]
	schema   string // quoted identifier
	timeout  time.Duration
	conn     string // the connection string with its password masked, for messages
	instance string
}

// IsURL reports whether a --store value names a PostgreSQL store rather
// than a file: a postgres:// or postgresql:// URL, or a libpq key=value
// string.
func IsURL(s string) bool {
	s = strings.TrimSpace(s)
	if strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://") {
		return true
	}
	// A key=value connection string ("host=db dbname=mfa"); a file path
	// holds no '=' before its first space in any sane layout.
	first, _, _ := strings.Cut(s, " ")
	return strings.Contains(first, "=") && !strings.Contains(first, "/")
}

// Open connects to the store (lazily: the first call dials). A malformed
// connection string is refused here; an unreachable database fails the
// first call (Check does one).
func Open(connString string, opts Options) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, fmt.Errorf("--store: not a valid PostgreSQL connection string (postgres://USER@HOST:PORT/DB or \"host=… dbname=…\"): %w", err)
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if cfg.ConnConfig.ConnectTimeout == 0 || cfg.ConnConfig.ConnectTimeout > opts.Timeout {
		cfg.ConnConfig.ConnectTimeout = opts.Timeout
	}
	if opts.Schema == "" {
		opts.Schema = DefaultSchema
	}
	if cfg.ConnConfig.RuntimeParams == nil {
		cfg.ConnConfig.RuntimeParams = map[string]string{}
	}
	if _, set := cfg.ConnConfig.RuntimeParams["application_name"]; !set {
		cfg.ConnConfig.RuntimeParams["application_name"] = "pgmfa"
	}
	// A few connections are plenty: every call is one short statement.
	if cfg.MaxConns > 8 || cfg.MaxConns == 0 {
		cfg.MaxConns = 8
	}
	// Logins are latency-bound: keep connections warm.
	cfg.MinConns = 1
	cfg.HealthCheckPeriod = 5 * time.Second
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		return nil, fmt.Errorf("--store: %w", err)
	}
	s := &Store{
		pool:    pool,
		schema:  pgx.Identifier{opts.Schema}.Sanitize(),
		timeout: opts.Timeout,
		conn:    describe(cfg),
	}
	if opts.Instance == "" {
		host, _ := os.Hostname()
		opts.Instance = fmt.Sprintf("%s:%d", host, os.Getpid())
	}
	s.instance = opts.Instance
	s.keyring.Store(opts.Keys)
	return s, nil
}

// SetKeys replaces the keyring (SIGHUP): the next call uses it.
func (s *Store) SetKeys(keys *mfa.Keyring) { s.keyring.Store(keys) }

func (s *Store) keys() *mfa.Keyring { return s.keyring.Load() }

func describe(cfg *pgxpool.Config) string {
	c := cfg.ConnConfig
	return fmt.Sprintf("postgres://%s@%s:%d/%s", c.User, c.Host, c.Port, c.Database)
}

// String names the store in messages (no password).
func (s *Store) String() string { return s.conn }

// Close closes the pool.
func (s *Store) Close() { s.pool.Close() }

func (s *Store) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), s.timeout)
}

// t qualifies a table name with the store's schema.
func (s *Store) t(name string) string { return s.schema + "." + name }

// wrap names the store in an error a person reads.
func (s *Store) wrap(err error) error {
	if err == nil {
		return nil
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "42P01" {
		return fmt.Errorf("store %s has no pgmfa schema %s (or this role may not see it): run `pgmfa store init --store …` first: %w", s.conn, s.schema, err)
	}
	if errors.As(err, &pe) && pe.Code == "42501" {
		return fmt.Errorf("store %s: permission denied; grant the proxy's role its privileges with `pgmfa store init --grant ROLE`: %w", s.conn, err)
	}
	return fmt.Errorf("store %s: %w", s.conn, err)
}

// Check verifies that the database answers and holds the schema at the
// version this pgmfa writes.
func (s *Store) Check() error {
	ctx, cancel := s.ctx()
	defer cancel()
	v, err := s.version(ctx, s.pool)
	if err != nil {
		return s.wrap(err)
	}
	switch {
	case v == 0:
		return fmt.Errorf("store %s has no pgmfa schema %s: run `pgmfa store init --store …` first", s.conn, s.schema)
	case v < len(migrations):
		return fmt.Errorf("store %s has schema version %d, this pgmfa needs %d: run `pgmfa store init --store …` to upgrade it", s.conn, v, len(migrations))
	case v > len(migrations):
		return fmt.Errorf("store %s has schema version %d, newer than this pgmfa (%d): upgrade pgmfa", s.conn, v, len(migrations))
	}
	return nil
}

// Secret implements mfa.Secrets (false also when the store cannot answer:
// the Guard uses LoadAccount, which says why).
func (s *Store) Secret(user string) (string, bool) {
	a, ok, err := s.LoadAccount(user)
	return a.Secret, ok && err == nil
}

// Account implements mfa.Accounts.
func (s *Store) Account(user string) (mfa.Account, bool) {
	a, ok, err := s.LoadAccount(user)
	return a, ok && err == nil
}

// LoadAccount implements mfa.AccountLoader: the enrollment of user with its
// secret opened.
func (s *Store) LoadAccount(user string) (mfa.Account, bool, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	var e mfa.Enrollment
	var sealed string
	err := s.pool.QueryRow(ctx, `SELECT secret, digits, period, algorithm, last_step FROM `+s.t("users")+` WHERE name = $1`, user).
		Scan(&sealed, &e.Digits, &e.Period, &e.Algorithm, &e.LastStep)
	if errors.Is(err, pgx.ErrNoRows) {
		return mfa.Account{}, false, nil
	}
	if err != nil {
		return mfa.Account{}, false, s.wrap(err)
	}
	if e.Secret, err = s.keys().Open(user, sealed); err != nil {
		return mfa.Account{}, false, fmt.Errorf("store %s: user %q: %w", s.conn, user, err)
	}
	return e.Account(), true, nil
}

// Code returns user's code at t (`pgmfa code`).
func (s *Store) Code(user string, t time.Time) (string, error) {
	a, ok, err := s.LoadAccount(user)
	if err != nil {
		return "", err
	}
	if !ok {
		return "", fmt.Errorf("user %q: %w", user, mfa.ErrNotEnrolled)
	}
	return mfa.CodeFor(a, t)
}

// Users returns the enrolled users, sorted.
func (s *Store) Users() ([]string, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT name FROM `+s.t("users")+` ORDER BY name`)
	if err != nil {
		return nil, s.wrap(err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	return names, s.wrap(err)
}

// Enroll creates (force: replaces) user's secret; see mfa.FileStore.Enroll.
func (s *Store) Enroll(user string, opts mfa.EnrollOptions, force bool) (*otp.Key, error) {
	key, e, err := mfa.NewEnrollment(user, opts)
	if err != nil {
		return nil, err
	}
	sealed, err := s.keys().Seal(user, e.Secret)
	if err != nil {
		return nil, err
	}
	ctx, cancel := s.ctx()
	defer cancel()
	q := `INSERT INTO ` + s.t("users") + ` (name, secret, key_id, secret_tag, digits, period, algorithm, issuer, enrolled)
		VALUES ($1, $2, NULLIF($3, ''), $4, $5, $6, $7, $8, $9) ON CONFLICT (name) DO `
	if force {
		// A new secret starts with no used step and no remember grants.
		q += `UPDATE SET secret = EXCLUDED.secret, key_id = EXCLUDED.key_id, secret_tag = EXCLUDED.secret_tag,
			digits = EXCLUDED.digits, period = EXCLUDED.period, algorithm = EXCLUDED.algorithm,
			issuer = EXCLUDED.issuer, enrolled = EXCLUDED.enrolled, last_step = 0`
	} else {
		q += `NOTHING`
	}
	tag, err := s.pool.Exec(ctx, q, user, sealed, s.keys().CurrentID(), mfa.SecretTag(e.Secret), e.Digits, e.Period, e.Algorithm, e.Issuer, e.Enrolled)
	if err != nil {
		return nil, s.wrap(err)
	}
	if tag.RowsAffected() == 0 {
		return nil, fmt.Errorf("user %q: %w", user, mfa.ErrAlreadyEnrolled)
	}
	return key, nil
}

// Remove deletes user's enrollment and remember grants; the user's
// passkeys and enrollment links go with the enrollment (ON DELETE CASCADE).
func (s *Store) Remove(user string) error {
	ctx, cancel := s.ctx()
	defer cancel()
	tag, err := s.pool.Exec(ctx, `WITH g AS (DELETE FROM `+s.t("grants")+` WHERE name = $1)
		DELETE FROM `+s.t("users")+` WHERE name = $1`, user)
	if err != nil {
		return s.wrap(err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("user %q: %w", user, mfa.ErrNotEnrolled)
	}
	return nil
}

// ClaimStep implements mfa.StepClaimer.
func (s *Store) ClaimStep(user string, stepStart int64, secret string) (bool, error) {
	return s.ClaimStepGrant(user, stepStart, secret, "", mfa.Grant{})
}

// ClaimStepGrant implements mfa.Shared: one conditional UPDATE claims the
// step (`last_step < $step` and the same secret), and in the same statement
// the grant is written if it claimed. Two instances claiming the same step
// serialize on the row: the second sees the first's step and claims
// nothing.
func (s *Store) ClaimStepGrant(user string, stepStart int64, secret string, grantKey string, g mfa.Grant) (bool, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	gUser, gAddr := splitGrantKey(grantKey)
	var claimed int
	err := s.pool.QueryRow(ctx, `WITH c AS (
			UPDATE `+s.t("users")+` SET last_step = $2 WHERE name = $1 AND secret_tag = $3 AND last_step < $2 RETURNING name
		), g AS (
			INSERT INTO `+s.t("grants")+` (name, addr, until, step_start, secret_tag)
			SELECT $4, $5, $6, $7, $8 FROM c WHERE $4 <> ''
			ON CONFLICT (name, addr) DO UPDATE SET until = EXCLUDED.until, step_start = EXCLUDED.step_start, secret_tag = EXCLUDED.secret_tag
		)
		SELECT count(*) FROM c`,
		user, stepStart, mfa.SecretTag(secret), gUser, gAddr, g.Until, g.StepStart, g.SecretTag).Scan(&claimed)
	if err != nil {
		return false, s.wrap(err)
	}
	if claimed == 1 {
		return true, nil
	}
	// Not claimed: say why (a second look; the claim itself was atomic).
	var tag string
	err = s.pool.QueryRow(ctx, `SELECT secret_tag FROM `+s.t("users")+` WHERE name = $1`, user).Scan(&tag)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return false, fmt.Errorf("user %q: %w", user, mfa.ErrNotEnrolled)
	case err != nil:
		return false, s.wrap(err)
	case tag != mfa.SecretTag(secret):
		return false, fmt.Errorf("user %q: %w", user, mfa.ErrSecretChanged)
	}
	return false, nil
}

// splitGrantKey splits the Guard's remember key (user NUL address): text
// in PostgreSQL cannot hold a NUL.
func splitGrantKey(key string) (user, addr string) {
	user, addr, _ = strings.Cut(key, "\x00")
	return user, addr
}

// Failures implements mfa.Shared.
func (s *Store) Failures(keys []string, since time.Time) (map[string][]time.Time, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT key, at FROM `+s.t("failures")+` WHERE key = ANY($1) AND at >= $2 ORDER BY at`, keys, since)
	if err != nil {
		return nil, s.wrap(err)
	}
	defer rows.Close()
	out := map[string][]time.Time{}
	for rows.Next() {
		var k string
		var at time.Time
		if err := rows.Scan(&k, &at); err != nil {
			return nil, s.wrap(err)
		}
		out[k] = append(out[k], at)
	}
	return out, s.wrap(rows.Err())
}

// failureRetention is how long failure rows are kept: longer than any
// sensible --mfa-failure-window. Rows of a key older than it are deleted
// when the key fails again.
const failureRetention = 24 * time.Hour

// AddFailure implements mfa.Shared.
func (s *Store) AddFailure(keys []string, at time.Time) error {
	ctx, cancel := s.ctx()
	defer cancel()
	_, err := s.pool.Exec(ctx, `WITH old AS (DELETE FROM `+s.t("failures")+` WHERE key = ANY($1) AND at < $3)
		INSERT INTO `+s.t("failures")+` (key, at) SELECT k, $2 FROM unnest($1::text[]) AS k`, keys, at, at.Add(-failureRetention))
	return s.wrap(err)
}

// ResetFailures implements mfa.Shared.
func (s *Store) ResetFailures(key string) error {
	ctx, cancel := s.ctx()
	defer cancel()
	_, err := s.pool.Exec(ctx, `DELETE FROM `+s.t("failures")+` WHERE key = $1`, key)
	return s.wrap(err)
}

// Grant implements mfa.Shared.
func (s *Store) Grant(key string, now time.Time) (mfa.Grant, bool, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	user, addr := splitGrantKey(key)
	var g mfa.Grant
	err := s.pool.QueryRow(ctx, `SELECT until, step_start, secret_tag FROM `+s.t("grants")+` WHERE name = $1 AND addr = $2 AND until > $3`, user, addr, now).
		Scan(&g.Until, &g.StepStart, &g.SecretTag)
	if errors.Is(err, pgx.ErrNoRows) {
		return mfa.Grant{}, false, nil
	}
	if err != nil {
		return mfa.Grant{}, false, s.wrap(err)
	}
	return g, true, nil
}

// PutGrant implements mfa.Shared.
func (s *Store) PutGrant(key string, g mfa.Grant) error {
	ctx, cancel := s.ctx()
	defer cancel()
	user, addr := splitGrantKey(key)
	_, err := s.pool.Exec(ctx, `INSERT INTO `+s.t("grants")+` (name, addr, until, step_start, secret_tag) VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (name, addr) DO UPDATE SET until = EXCLUDED.until, step_start = EXCLUDED.step_start, secret_tag = EXCLUDED.secret_tag`,
		user, addr, g.Until, g.StepStart, g.SecretTag)
	return s.wrap(err)
}

// Import writes enrollments (with their last used steps) in one
// transaction (`pgmfa store migrate`). A user already in the store fails
// the whole import and nothing is written.
func (s *Store) Import(es map[string]mfa.Enrollment) error {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout+time.Duration(len(es))*10*time.Millisecond)
	defer cancel()
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var exists []string
		for name, e := range es {
			if err := mfa.ValidUser(name); err != nil {
				return err
			}
			if err := e.Check(); err != nil {
				return fmt.Errorf("user %q: %w", name, err)
			}
			sealed, err := s.keys().Seal(name, e.Secret)
			if err != nil {
				return err
			}
			tag, err := tx.Exec(ctx, `INSERT INTO `+s.t("users")+` (name, secret, key_id, secret_tag, digits, period, algorithm, issuer, enrolled, last_step)
				VALUES ($1, $2, NULLIF($3, ''), $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (name) DO NOTHING`,
				name, sealed, s.keys().CurrentID(), mfa.SecretTag(e.Secret), e.Digits, e.Period, e.Algorithm, e.Issuer, e.Enrolled, e.LastStep)
			if err != nil {
				return s.wrap(err)
			}
			if tag.RowsAffected() == 0 {
				exists = append(exists, name)
			}
		}
		if len(exists) > 0 {
			return fmt.Errorf("already in the store %s, nothing was imported: %s (remove them there first, or leave them out)", s.conn, strings.Join(exists, ", "))
		}
		return nil
	})
}

// Reseal re-encrypts every secret under the current key of the keyring in
// one transaction (`pgmfa store rotate-key`). A secret that does not open
// (unknown key id, tampered) fails the whole rotation and nothing is
// written. It returns how many secrets it rewrote.
func (s *Store) Reseal() (int, error) {
	if s.keys() == nil {
		return 0, mfa.ErrNoKey
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*s.timeout)
	defer cancel()
	n := 0
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `SELECT name, secret FROM `+s.t("users")+` ORDER BY name FOR UPDATE`)
		if err != nil {
			return s.wrap(err)
		}
		type rec struct{ name, secret string }
		recs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (rec, error) {
			var x rec
			return x, r.Scan(&x.name, &x.secret)
		})
		if err != nil {
			return s.wrap(err)
		}
		for _, r := range recs {
			plain, err := s.keys().Open(r.name, r.secret)
			if err != nil {
				return fmt.Errorf("user %q: %w; nothing was re-encrypted", r.name, err)
			}
			sealed, err := s.keys().Seal(r.name, plain)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE `+s.t("users")+` SET secret = $2, key_id = $3 WHERE name = $1`, r.name, sealed, s.keys().CurrentID()); err != nil {
				return s.wrap(err)
			}
			n++
		}
		// The accounts' sealed fields and the passkeys too (not counted: n
		// is secrets).
		if _, err := s.resealAccounts(ctx, tx); err != nil {
			return err
		}
		return s.resealPasskeys(ctx, tx)
	})
	return n, err
}

// Plaintext is how many secrets the store holds unencrypted (written
// before encryption, or without a key): TOTP secrets and passkeys.
func (s *Store) Plaintext() (int, error) {
	ctx, cancel := s.ctx()
	defer cancel()
	var n int
	err := s.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM `+s.t("users")+` WHERE key_id IS NULL)
		+ (SELECT count(*) FROM `+s.t("passkeys")+` WHERE key_id IS NULL)`).Scan(&n)
	return n, s.wrap(err)
}

// Prune deletes what no decision reads any more: failures older than a
// day, remember grants expired for a day, waiting logins older than
// PendingMaxAge (left by an instance that died), passkey enrollment links
// used or expired. pgmfa serve runs it every few minutes; every instance
// may, the deletes are idempotent.
func (s *Store) Prune(now time.Time) error {
	ctx, cancel := s.ctx()
	defer cancel()
	_, err := s.pool.Exec(ctx, `WITH f AS (DELETE FROM `+s.t("failures")+` WHERE at < $1),
		g AS (DELETE FROM `+s.t("grants")+` WHERE until < $1),
		l AS (DELETE FROM `+s.t("passkey_links")+` WHERE used OR expires <= $3)
		DELETE FROM `+s.t("pending")+` WHERE since < $2`, now.Add(-failureRetention), now.Add(-PendingMaxAge), now)
	return s.wrap(err)
}
