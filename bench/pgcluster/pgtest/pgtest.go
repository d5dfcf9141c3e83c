// Package pgtest is the testing side of bench/pgcluster: it starts clusters
// for tests and decides, in one place for the whole repository, when a test
// whose environment is missing (no PostgreSQL, not root, no BPF) skips and
// when it fails. Only tests import it, so the shipped binaries never link
// the testing package.
package pgtest

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
)

// InCI reports whether the run is CI, where every test must run: CI is set
// to anything but "", "0" or "false" (.ci/run sets CI=true; CI=1 counts the
// same). Before this helper, some tests read CI != "" and others CI ==
// "true", so CI=1 failed loop tests while BPF tests skipped.
func InCI() bool {
	switch os.Getenv("CI") {
	case "", "0", "false", "FALSE", "False":
		return false
	}
	return true
}

// SkipOrFail skips the test with the reason outside CI and fails it under
// CI (InCI): a test that cannot run where it must is a failure.
func SkipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("CI: this test must run here, but: %s", msg)
		return
	}
	t.Skip(msg)
}

// Missing reports whether a Start error means "this machine cannot start a
// cluster" (no server binaries, not root) rather than a real failure.
func Missing(err error) bool {
	return errors.Is(err, pgcluster.ErrNoBinaries) || errors.Is(err, pgcluster.ErrNotRoot)
}

// Check turns a pgcluster.Start error into the test's outcome: nothing for
// nil, SkipOrFail when the machine cannot start clusters, Fatal otherwise.
func Check(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if Missing(err) {
		SkipOrFail(t, "%v", err)
		return
	}
	t.Fatalf("start PostgreSQL: %v", err)
}

// Start starts a cluster for one test and stops it in the test's cleanup.
// Under -v the harness's pg_ctl and psql output goes to the test log.
func Start(t testing.TB, opts pgcluster.Options) *pgcluster.Cluster {
	t.Helper()
	if opts.Log == nil && testing.Verbose() {
		opts.Log = t.Logf
	}
	c, err := pgcluster.Start(opts)
	Check(t, err)
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Errorf("stop PostgreSQL: %v", err)
		}
	})
	return c
}

// Shared is a cluster started once for a whole test binary (starting one
// costs seconds) on the first Get, and stopped by Stop from TestMain. A
// start that failed is not retried: every later Get reports the same error.
type Shared struct {
	Options pgcluster.Options

	once sync.Once
	c    *pgcluster.Cluster
	err  error
}

// Get returns the cluster, starting it on first use; it skips or fails the
// test as Check does when the cluster cannot start.
func (s *Shared) Get(t testing.TB) *pgcluster.Cluster {
	t.Helper()
	s.once.Do(func() { s.c, s.err = pgcluster.Start(s.Options) })
	Check(t, s.err)
	return s.c
}

// Started is the cluster if Get started one (nil otherwise).
func (s *Shared) Started() *pgcluster.Cluster { return s.c }

// Stop stops the cluster if it was started; for TestMain.
func (s *Shared) Stop() error {
	if s.c == nil {
		return nil
	}
	return s.c.Stop()
}
