package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/mfa/pgstore"
)

// This file is the suite's only contact with pgmfa's secret store, so that
// a change in the mfa package's API is fixed up here alone.

// enrollTOTP enrolls users in a fresh store file at path (the file pgmfa
// serve --store reads) and returns a function giving each user's current
// code. The benchmark owns the store, so it computes codes the way an
// authenticator app would.
func enrollTOTP(path string, users ...string) (codeFor func(user string) (string, error), err error) {
	st, err := mfa.OpenFileStore(path)
	if err != nil {
		return nil, fmt.Errorf("open TOTP store: %w", err)
	}
	for _, u := range users {
		if _, err := st.Enroll(u, mfa.EnrollOptions{}, true); err != nil {
			return nil, fmt.Errorf("enroll %s: %w", u, err)
		}
	}
	return func(user string) (string, error) { return st.Code(user, time.Now()) }, nil
}

// enrollPgstore prepares a PostgreSQL MFA store for a path: a key file in
// dir (what `pgmfa store new-key` writes), the store's schema in the
// database at dsn (what `pgmfa store init` creates) and users enrolled in
// it. It returns the key file and the code function.
func enrollPgstore(dsn, dir string, users ...string) (keyFile string, codeFor func(user string) (string, error), err error) {
	text, err := mfa.NewKeyText()
	if err != nil {
		return "", nil, err
	}
	keyFile = filepath.Join(dir, "store.key")
	if err := os.WriteFile(keyFile, []byte(text), 0o600); err != nil {
		return "", nil, err
	}
	keys, err := mfa.LoadKeyring(keyFile)
	if err != nil {
		return "", nil, fmt.Errorf("store key: %w", err)
	}
	st, err := pgstore.Open(dsn, pgstore.Options{Keys: keys})
	if err != nil {
		return "", nil, fmt.Errorf("open the PostgreSQL store: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, _, err := st.Init(ctx); err != nil {
		st.Close()
		return "", nil, fmt.Errorf("store init: %w", err)
	}
	for _, u := range users {
		if _, err := st.Enroll(u, mfa.EnrollOptions{}, true); err != nil {
			st.Close()
			return "", nil, fmt.Errorf("enroll %s: %w", u, err)
		}
	}
	// The suite keeps the store open for the codes; the process ends it.
	return keyFile, func(user string) (string, error) { return st.Code(user, time.Now()) }, nil
}
