package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/mfa/userlist"
	"github.com/pgmfa/pgmfa/proto"
)

// importUserlist is `pgmfa account import`: pgbouncer's users become
// accounts with the verifiers they have.
func importUserlist(accts accountStore, file, role, dbPasswordFile string, iterations int, stdout, stderr io.Writer, storeName string) int {
	fail := func(err error) int {
		fmt.Fprintf(stderr, "pgmfa account import: %v\n", err)
		return 1
	}
	if file == "" {
		return fail(errors.New("--userlist FILE is required"))
	}
	if iterations < 1 || iterations > 1<<24 {
		return fail(errors.New("--scram-iterations must be between 1 and 16777216"))
	}
	f, err := os.Open(file)
	if err != nil {
		return fail(err)
	}
	entries, err := userlist.Parse(f)
	f.Close()
	if err != nil {
		return fail(fmt.Errorf("%s: %w", file, err))
	}
	if len(entries) == 0 {
		return fail(fmt.Errorf("%s holds no user", file))
	}
	var dbPassword string
	if dbPasswordFile != "" {
		if dbPassword, err = readFirstLine(dbPasswordFile); err != nil {
			return fail(err)
		}
	}
	// Everything is checked before anything is written.
	recs := make([]mfa.AccountRecord, len(entries))
	var exists []string
	kinds := map[string]int{}
	for i, e := range entries {
		if err := mfa.ValidAccountName(e.User); err != nil {
			return fail(err)
		}
		if _, ok, err := accts.GetAccount(e.User); err != nil {
			return fail(err)
		} else if ok {
			exists = append(exists, e.User)
		}
		r := mfa.AccountRecord{Role: role, DBPassword: dbPassword}
		if r.Role == "" {
			r.Role = e.User
		}
		switch e.Kind() {
		case "plaintext":
			if r.Verifier, err = makeVerifier(e.User, e.Password, iterations, false); err != nil {
				return fail(err)
			}
		default:
			v, err := proto.ParseVerifier(e.Password)
			if err != nil {
				return fail(fmt.Errorf("user %q: %w", e.User, err))
			}
			r.Verifier = v.String()
		}
		kinds[e.Kind()]++
		recs[i] = r
	}
	if len(exists) > 0 {
		return fail(fmt.Errorf("already accounts, nothing was imported: %s (remove them first, or leave them out of the file)", strings.Join(exists, ", ")))
	}
	for i, e := range entries {
		if err := accts.AddAccount(e.User, recs[i]); err != nil {
			return fail(fmt.Errorf("after %d of %d accounts: %w", i, len(entries), err))
		}
	}
	fmt.Fprintf(stdout, "Imported %d accounts into %s: %d SCRAM-SHA-256, %d MD5, %d plaintext turned into SCRAM-SHA-256 verifiers.\n",
		len(entries), storeName, kinds["scram-sha-256"], kinds["md5"], kinds["plaintext"])
	if kinds["md5"] > 0 {
		fmt.Fprintln(stdout, "MD5 accounts log in only with serve --account-method md5.")
	}
	fmt.Fprint(stdout, reloadNote)
	return 0
}

// accountsAbsent fails when one of names already is an account of dst.
func accountsAbsent(dst accountStore, names []string) error {
	var exists []string
	for _, n := range names {
		_, ok, err := dst.GetAccount(n)
		if err != nil {
			return err
		}
		if ok {
			exists = append(exists, n)
		}
	}
	if len(exists) > 0 {
		return fmt.Errorf("accounts already in the store, nothing was copied: %s", strings.Join(exists, ", "))
	}
	return nil
}

// migrateAccounts copies the accounts of a file store (`store migrate`).
// The PostgreSQL store makes its own secret for unknown accounts' salts:
// they change once, as a restart without the store's secret would change
// them.
func migrateAccounts(src *mfa.FileStore, dst accountStore, names []string) error {
	for i, n := range names {
		rec, ok := src.LookupAccount(n)
		if !ok {
			continue
		}
		if err := dst.AddAccount(n, rec); err != nil {
			return fmt.Errorf("after %d of %d accounts: %w", i, len(names), err)
		}
	}
	return nil
}
