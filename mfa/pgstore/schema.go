package pgstore

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// migrations are the schema's versions, in order; version N is the state
// after migrations[N-1]. Never edit one that shipped: append.
// "{s}" stands for the quoted schema name.
var migrations = []string{
	// 1: enrollments, single use, throttling, remember, waiting logins.
	`CREATE TABLE {s}.users (
		name       text PRIMARY KEY,
		secret     text NOT NULL,  -- sealed (aes256gcm:KEYID:…) or, before encryption, base32
		key_id     text,           -- the sealing key's id; NULL: plaintext
		secret_tag text NOT NULL,  -- a one-way tag of the secret (single use checks it did not change)
		digits     int  NOT NULL,
		period     int  NOT NULL,
		algorithm  text NOT NULL,
		issuer     text NOT NULL DEFAULT '',
		enrolled   timestamptz,
		last_step  bigint NOT NULL DEFAULT 0  -- unix second of the last accepted code's step
	);
	CREATE TABLE {s}.failures (
		key text NOT NULL,         -- user:NAME, addr:IP, approver:WHO
		at  timestamptz NOT NULL
	);
	CREATE INDEX failures_key_at ON {s}.failures (key, at);
	CREATE INDEX failures_at ON {s}.failures (at);
	CREATE TABLE {s}.grants (
		name       text NOT NULL,
		addr       text NOT NULL,
		until      timestamptz NOT NULL,
		step_start bigint NOT NULL,
		secret_tag text NOT NULL,
		PRIMARY KEY (name, addr)
	);
	CREATE INDEX grants_until ON {s}.grants (until);
	CREATE TABLE {s}.pending (
		id        bigserial PRIMARY KEY,
		instance  text NOT NULL,
		name      text NOT NULL,
		addr      text NOT NULL,
		database  text NOT NULL DEFAULT '',
		app_name  text NOT NULL DEFAULT '',
		since     timestamptz NOT NULL,
		released  boolean NOT NULL DEFAULT false  -- approved; the instance holding it lets it in
	);
	CREATE INDEX pending_since ON {s}.pending (since);`,
	// 2: the accounts pgmfa authenticates itself (--auth accounts).
	`CREATE TABLE {s}.accounts (
		name        text PRIMARY KEY,
		verifier    text NOT NULL,             -- SCRAM-SHA-256 or md5 verifier, sealed with a key
		role        text NOT NULL,             -- the database role pgmfa logs in as
		db_password text NOT NULL DEFAULT '',  -- sealed (never plaintext); '': none
		created     timestamptz NOT NULL DEFAULT now()
	);
	CREATE TABLE {s}.account_secret (
		id     int PRIMARY KEY CHECK (id = 1),
		secret text NOT NULL                   -- keys unknown accounts' dummy salts; sealed with a key
	);`,
	// 3: passkeys (WebAuthn credentials) and their enrollment links. Both
	// go with their user: removing the enrollment removes them.
	`CREATE TABLE {s}.passkeys (
		id         bytea PRIMARY KEY CHECK (octet_length(id) BETWEEN 1 AND 1023),  -- the credential id
		name       text NOT NULL REFERENCES {s}.users (name) ON DELETE CASCADE,
		data       text NOT NULL,            -- sealed (aes256gcm:KEYID:…) or, without a key, base64
		key_id     text,                     -- the sealing key's id; NULL: plaintext
		sign_count bigint NOT NULL DEFAULT 0 CHECK (sign_count BETWEEN 0 AND 4294967295),
		created    timestamptz NOT NULL DEFAULT now()
	);
	CREATE INDEX passkeys_name ON {s}.passkeys (name, created);
	CREATE TABLE {s}.passkey_links (
		token_hash bytea PRIMARY KEY CHECK (octet_length(token_hash) = 32),  -- SHA-256 of the token; the token is never stored
		name       text NOT NULL REFERENCES {s}.users (name) ON DELETE CASCADE,
		expires    timestamptz NOT NULL,
		used       boolean NOT NULL DEFAULT false
	);
	CREATE INDEX passkey_links_name ON {s}.passkey_links (name);
	CREATE INDEX passkey_links_expires ON {s}.passkey_links (expires);`,
}

// version reads the schema's version; 0 when there is no schema.
func (s *Store) version(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (int, error) {
	var v int
	err := q.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM `+s.t("schema_version")).Scan(&v)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && (pe.Code == "42P01" || pe.Code == "3F000") {
		return 0, nil
	}
	return v, err
}

// Init creates the schema or upgrades it to this pgmfa's version, in one
// transaction under an advisory lock, so two concurrent inits (two hosts
// starting their deployment at once) do the work once. It returns the
// version before and after. Running it again is a no-op.
func (s *Store) Init(ctx context.Context) (from, to int, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('pgmfa store init'))`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+s.schema); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+s.t("schema_version")+` (version int PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())`); err != nil {
			return err
		}
		v, err := s.version(ctx, tx)
		if err != nil {
			return err
		}
		from = v
		if v > len(migrations) {
			return fmt.Errorf("schema version %d is newer than this pgmfa (%d): upgrade pgmfa", v, len(migrations))
		}
		for i := v; i < len(migrations); i++ {
			if _, err := tx.Exec(ctx, strings.ReplaceAll(migrations[i], "{s}", s.schema)); err != nil {
				return fmt.Errorf("migration %d: %w", i+1, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO `+s.t("schema_version")+` (version) VALUES ($1)`, i+1); err != nil {
				return err
			}
		}
		to = len(migrations)
		return nil
	})
	if err != nil {
		return 0, 0, s.wrap(err)
	}
	return from, to, nil
}

// GrantSQL is what a proxy's role needs, and nothing more: read and update
// enrollments (single use), count failures, keep grants and waiting logins,
// read the accounts, read and register passkeys (the approval page),
// use enrollment links and prune them.
// It cannot create, drop or alter anything, nor read any other schema.
// `pgmfa enroll` and `pgmfa store …` need the owner (or a role with
// INSERT/DELETE on users as well).
func (s *Store) GrantSQL(role string) []string {
	r := pgx.Identifier{role}.Sanitize()
	return []string{
		`GRANT USAGE ON SCHEMA ` + s.schema + ` TO ` + r,
		`GRANT SELECT ON ` + s.t("schema_version") + ` TO ` + r,
		`GRANT SELECT, UPDATE (last_step) ON ` + s.t("users") + ` TO ` + r,
		`GRANT SELECT, INSERT, DELETE ON ` + s.t("failures") + ` TO ` + r,
		`GRANT SELECT, INSERT, UPDATE, DELETE ON ` + s.t("grants") + ` TO ` + r,
		`GRANT SELECT, INSERT, DELETE, UPDATE (released) ON ` + s.t("pending") + ` TO ` + r,
		`GRANT USAGE ON SEQUENCE ` + s.t("pending_id_seq") + ` TO ` + r,
		`GRANT SELECT ON ` + s.t("accounts") + `, ` + s.t("account_secret") + ` TO ` + r,
		`GRANT SELECT, INSERT, UPDATE (sign_count) ON ` + s.t("passkeys") + ` TO ` + r,
		`GRANT SELECT, DELETE, UPDATE (used) ON ` + s.t("passkey_links") + ` TO ` + r,
	}
}

// Grant runs GrantSQL for role.
func (s *Store) GrantRole(ctx context.Context, role string) error {
	return s.wrap(pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		for _, q := range s.GrantSQL(role) {
			if _, err := tx.Exec(ctx, q); err != nil {
				return err
			}
		}
		return nil
	}))
}
