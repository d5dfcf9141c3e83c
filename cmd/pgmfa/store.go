package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	iofs "io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pquerna/otp"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/mfa/pgstore"
)

func init() {
	register("store", "manage the secret store: init a PostgreSQL store, new-key, rotate-key, migrate a file store", runStore)
}

// mfaStore is what the subcommands need of a store, file or PostgreSQL.
type mfaStore interface {
	mfa.Secrets
	// Passkeys and their enrollment links (enroll --webauthn).
	mfa.PasskeyStore
	Enroll(user string, opts mfa.EnrollOptions, force bool) (*otp.Key, error)
	Remove(user string) error
	Code(user string, t time.Time) (string, error)
	Users() ([]string, error)
	// Reload re-reads what the store caches and the key file (SIGHUP).
	Reload() error
	// Reseal re-encrypts every secret with the current key.
	Reseal() (int, error)
	// Plaintext counts the secrets stored unencrypted.
	Plaintext() (int, error)
	String() string
	Close()
}

// defaultKeyFile is --store-key-file unless given: $PGMFA_STORE_KEY_FILE.
func defaultKeyFile() string { return os.Getenv("PGMFA_STORE_KEY_FILE") }

const keyFileUsage = "file holding the key(s) that encrypt secrets in the store (one base64 AES-256 key per line, the first encrypts; written by \"pgmfa store new-key\"; mode 0600). Without it the key may come from the environment variable " + mfa.KeyEnv + " (env PGMFA_STORE_KEY_FILE)"

const storeUsage = "the secret store: a JSON file path, or a PostgreSQL connection string (postgres://USER@HOST/DB or \"host=… dbname=…\") initialised with \"pgmfa store init\" (env PGMFA_STORE)"

// openStore opens spec as a PostgreSQL store (a connection string) or a
// file store (a path), with the keyring of keyFile.
func openStore(spec, keyFile string) (mfaStore, error) {
	return openStoreTimeout(spec, keyFile, 0)
}

// openStoreTimeout is openStore with a deadline for every call of a
// PostgreSQL store (0: pgstore.DefaultTimeout).
func openStoreTimeout(spec, keyFile string, timeout time.Duration) (mfaStore, error) {
	keys, err := mfa.LoadKeyring(keyFile)
	if err != nil {
		return nil, err
	}
	if pgstore.IsURL(spec) {
		s, err := pgstore.Open(spec, pgstore.Options{Keys: keys, Timeout: timeout})
		if err != nil {
			return nil, err
		}
		return &pgStore{Store: s, keyFile: keyFile}, nil
	}
	s, err := mfa.OpenFileStoreKeyed(spec, keys)
	if err != nil {
		return nil, err
	}
	return &fileStore{FileStore: s, keyFile: keyFile}, nil
}

// fileStore adapts *mfa.FileStore to mfaStore.
type fileStore struct {
	*mfa.FileStore
	keyFile string
}

func (f *fileStore) Users() ([]string, error) { return f.FileStore.Users(), nil }
func (f *fileStore) Plaintext() (int, error)  { return f.FileStore.Plaintext(), nil }
func (f *fileStore) String() string           { return f.Path() }
func (f *fileStore) Close()                   {}
func (f *fileStore) Reload() error {
	keys, err := mfa.LoadKeyring(f.keyFile)
	if err != nil {
		return err
	}
	f.SetKeys(keys)
	return f.FileStore.Reload()
}

// pgStore adapts *pgstore.Store to mfaStore.
type pgStore struct {
	*pgstore.Store
	keyFile string
}

// Reload re-reads the key file; the records themselves are read at every
// login.
func (p *pgStore) Reload() error {
	keys, err := mfa.LoadKeyring(p.keyFile)
	if err != nil {
		return err
	}
	p.SetKeys(keys)
	return nil
}

// plaintextNote says how to encrypt a store that holds plaintext secrets
// ("" when it holds none).
func plaintextNote(s mfaStore, keyFile string) string {
	n, err := s.Plaintext()
	if err != nil || n == 0 {
		return ""
	}
	kf := keyFile
	if kf == "" {
		kf = "/etc/pgmfa/store.key"
	}
	return fmt.Sprintf("the store %s holds %d secret(s) unencrypted; encrypt them with: pgmfa store new-key --store-key-file %s && pgmfa store rotate-key --store %q --store-key-file %s (then give every pgmfa that --store-key-file)",
		s, n, kf, s.String(), kf)
}

func runStore(args []string) int { return storeCmd(args, os.Stdout, os.Stderr) }

func storeCmd(args []string, stdout, stderr io.Writer) int {
	usage := func() {
		fmt.Fprint(stderr, `usage: pgmfa store init       --store postgres://… [--grant ROLE]
       pgmfa store new-key    --store-key-file FILE
       pgmfa store rotate-key --store STORE --store-key-file FILE
       pgmfa store migrate    --from FILE --to postgres://… [--store-key-file FILE]

init        creates or upgrades the PostgreSQL store's schema ("pgmfa"); safe to
            run again; --grant ROLE gives a proxy's role exactly what it needs
new-key     writes a new random key as the first line of FILE (created 0600);
            the keys already there stay, so records sealed with them still open
rotate-key  re-encrypts every secret in the store with the first key of FILE
            (also encrypts a store written before encryption)
migrate     copies every enrollment (and its last used code) from a file store
            into a PostgreSQL store, in one transaction

`+"`pgmfa store SUBCOMMAND --help`"+` lists its flags.
`)
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage()
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	switch args[0] {
	case "init":
		return storeInit(args[1:], stdout, stderr)
	case "new-key":
		return storeNewKey(args[1:], stdout, stderr)
	case "rotate-key":
		return storeRotate(args[1:], stdout, stderr)
	case "migrate":
		return storeMigrate(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "pgmfa store: unknown subcommand %q\n\n", args[0])
	usage()
	return 2
}

func storeFlags(name, usage string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("store "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage+"\nflags:\n")
		fs.PrintDefaults()
	}
	return fs
}

func storeInit(args []string, stdout, stderr io.Writer) int {
	fs := storeFlags("init", `usage: pgmfa store init --store postgres://… [--grant ROLE]

Creates the schema "pgmfa" in the database of --store, or upgrades it to
this pgmfa's version. Run it as the role that should own the schema; it is
safe to run again and from several hosts at once. With --grant ROLE, ROLE
(the role every pgmfa serve connects as) gets only what a proxy needs:
SELECT on the enrollments and UPDATE of their last used code, and rows in
the failure, remember and waiting-login tables. It cannot enroll users or
change the schema: run enroll and store commands as the owner.
`, stderr)
	store := fs.String("store", defaultStorePath(), "PostgreSQL connection string of the store (env PGMFA_STORE)")
	grant := fs.String("grant", "", "role to grant a proxy's privileges to (it must exist)")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the database")
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	if !pgstore.IsURL(*store) {
		fmt.Fprintf(stderr, "pgmfa store init: --store %q is a file; init is for a PostgreSQL store (postgres://… or \"host=… dbname=…\"). A file store needs no init.\n", *store)
		return 2
	}
	s, err := pgstore.Open(*store, pgstore.Options{Timeout: *timeout})
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa store init:", err)
		return 1
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	from, to, err := s.Init(ctx)
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa store init:", err)
		return 1
	}
	if from == to {
		fmt.Fprintf(stdout, "store %s: schema %s is up to date (version %d)\n", s, pgstore.DefaultSchema, to)
	} else {
		fmt.Fprintf(stdout, "store %s: schema %s upgraded from version %d to %d\n", s, pgstore.DefaultSchema, from, to)
	}
	if *grant != "" {
		if err := s.GrantRole(ctx, *grant); err != nil {
			fmt.Fprintln(stderr, "pgmfa store init:", err)
			return 1
		}
		fmt.Fprintf(stdout, "granted role %q what pgmfa serve needs:\n  %s\n", *grant, strings.Join(s.GrantSQL(*grant), ";\n  ")+";")
	}
	return 0
}

func storeNewKey(args []string, stdout, stderr io.Writer) int {
	fs := storeFlags("new-key", `usage: pgmfa store new-key --store-key-file FILE

Writes a new random AES-256 key as the first line of FILE (created with mode
0600). Keys already in FILE stay below it: records sealed with them still
open. New secrets are sealed with the first key; `+"`pgmfa store rotate-key`"+`
re-seals the old ones. To rotate a fleet without downtime: new-key, copy FILE
to every host, SIGHUP every pgmfa serve, rotate-key, then remove the old line.
`, stderr)
	keyFile := fs.String("store-key-file", defaultKeyFile(), "the key file to create or extend")
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if *keyFile == "" || fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	var old string
	if b, err := os.ReadFile(*keyFile); err == nil {
		if _, err := mfa.LoadKeyring(*keyFile); err != nil {
			fmt.Fprintln(stderr, "pgmfa store new-key:", err, "(the file was not changed)")
			return 1
		}
		old = string(b)
	} else if !errors.Is(err, iofs.ErrNotExist) {
		fmt.Fprintln(stderr, "pgmfa store new-key:", err)
		return 1
	}
	k, err := mfa.NewKeyText()
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa store new-key:", err)
		return 1
	}
	text := "# pgmfa store key: the first key encrypts, every key decrypts\n" + k + "\n" + stripKeyHeader(old)
	kr, err := mfa.ParseKeyring(text)
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa store new-key:", err)
		return 1
	}
	if err := writePrivate(*keyFile, []byte(text)); err != nil {
		fmt.Fprintln(stderr, "pgmfa store new-key:", err)
		return 1
	}
	fmt.Fprintf(stdout, "wrote key %s to %s (%d key(s) in the file)\n", kr.CurrentID(), *keyFile, len(kr.IDs()))
	return 0
}

// stripKeyHeader drops the header line new-key writes, so repeated
// new-keys do not stack headers.
func stripKeyHeader(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "# pgmfa store key") || strings.TrimSpace(l) == "" {
			continue
		}
		out = append(out, l)
	}
	if len(out) == 0 {
		return ""
	}
	return strings.Join(out, "\n") + "\n"
}

// writePrivate writes data to path atomically with mode 0600.
func writePrivate(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func storeRotate(args []string, stdout, stderr io.Writer) int {
	fs := storeFlags("rotate-key", `usage: pgmfa store rotate-key --store STORE --store-key-file FILE

Re-encrypts every secret in the store with the first key of FILE; secrets
sealed with another key of FILE, or stored unencrypted, are all rewritten.
It is one transaction (PostgreSQL) or one atomic file write: a secret that
does not decrypt (a key missing from FILE, a tampered record) stops it and
nothing is changed.
`, stderr)
	store := fs.String("store", defaultStorePath(), storeUsage)
	keyFile := fs.String("store-key-file", defaultKeyFile(), keyFileUsage)
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	if !pgstore.IsURL(*store) {
		// A missing file would be created empty: say so instead.
		if _, err := os.Stat(*store); err != nil {
			fmt.Fprintln(stderr, "pgmfa store rotate-key: --store:", err)
			return 1
		}
	}
	s, err := openStore(*store, *keyFile)
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa store rotate-key:", err)
		return 1
	}
	defer s.Close()
	n, err := s.Reseal()
	if errors.Is(err, mfa.ErrNoKey) {
		fmt.Fprintln(stderr, "pgmfa store rotate-key: no key given: --store-key-file FILE (create one with pgmfa store new-key)")
		return 2
	}
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa store rotate-key:", err)
		return 1
	}
	keys, _ := mfa.LoadKeyring(*keyFile)
	fmt.Fprintf(stdout, "re-encrypted %d secret(s) in %s with key %s\n", n, s, keys.CurrentID())
	return 0
}

func storeMigrate(args []string, stdout, stderr io.Writer) int {
	fs := storeFlags("migrate", `usage: pgmfa store migrate --from FILE --to postgres://… [--store-key-file FILE]

Copies every enrollment of the file store FILE, with the last code each user
used (so no used code works again), into the PostgreSQL store, in one
transaction, then its accounts (--auth accounts; an account already in the
PostgreSQL store stops the migration before anything is written). Run pgmfa store init on the PostgreSQL store first. A user
already in it stops the migration and nothing is written. The file is not
changed. With --store-key-file the secrets are encrypted in PostgreSQL (and
FILE's own encrypted secrets are read with the same keys). The passkeys
are copied with their users; open passkey enrollment links are not (make
new ones with pgmfa enroll --webauthn).
`, stderr)
	from := fs.String("from", "", "the file store to copy from")
	to := fs.String("to", "", "the PostgreSQL store to copy into")
	keyFile := fs.String("store-key-file", defaultKeyFile(), keyFileUsage)
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if *from == "" || *to == "" || fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	if pgstore.IsURL(*from) || !pgstore.IsURL(*to) {
		fmt.Fprintln(stderr, "pgmfa store migrate: --from is a file store, --to a PostgreSQL connection string")
		return 2
	}
	keys, err := mfa.LoadKeyring(*keyFile)
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa store migrate:", err)
		return 1
	}
	if _, err := os.Stat(*from); err != nil {
		fmt.Fprintln(stderr, "pgmfa store migrate: --from:", err)
		return 1
	}
	src, err := mfa.OpenFileStoreKeyed(*from, keys)
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa store migrate:", err)
		return 1
	}
	dst, err := pgstore.Open(*to, pgstore.Options{Keys: keys, Timeout: 30 * time.Second})
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa store migrate:", err)
		return 1
	}
	defer dst.Close()
	if err := dst.Check(); err != nil {
		fmt.Fprintln(stderr, "pgmfa store migrate:", err)
		return 1
	}
	// The accounts of --auth accounts are checked before anything is
	// written, and copied after the enrollments (migrateAccounts).
	accts := src.AccountNames()
	if err := accountsAbsent(dst, accts); err != nil {
		fmt.Fprintln(stderr, "pgmfa store migrate:", err)
		return 1
	}
	es := src.Enrollments()
	if err := dst.Import(es); err != nil {
		fmt.Fprintln(stderr, "pgmfa store migrate:", err)
		return 1
	}
	fmt.Fprintf(stdout, "copied %d enrollment(s) from %s to %s\n", len(es), *from, dst)
	pks, err := src.AllPasskeys()
	if err == nil {
		var n int
		if n, err = dst.ImportPasskeys(pks); n > 0 {
			fmt.Fprintf(stdout, "copied %d passkey(s)\n", n)
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa store migrate: passkeys:", err)
		return 1
	}
	if err := migrateAccounts(src, dst, accts); err != nil {
		fmt.Fprintln(stderr, "pgmfa store migrate:", err)
		return 1
	}
	if len(accts) > 0 {
		fmt.Fprintf(stdout, "copied %d account(s)\n", len(accts))
	}
	if keys == nil {
		fmt.Fprintf(stdout, "the secrets are stored unencrypted; encrypt them with: pgmfa store new-key --store-key-file FILE && pgmfa store rotate-key --store %q --store-key-file FILE\n", *to)
	}
	fmt.Fprintf(stdout, "point every pgmfa at it: --store %q\n", *to)
	return 0
}
