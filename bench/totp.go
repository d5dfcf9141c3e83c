package main

import (
	"fmt"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
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
