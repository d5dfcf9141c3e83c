package pgtest

import (
	"fmt"
	"testing"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
)

func TestInCI(t *testing.T) {
	for v, want := range map[string]bool{"": false, "0": false, "false": false, "true": true, "1": true, "yes": true} {
		t.Setenv("CI", v)
		if InCI() != want {
			t.Errorf("CI=%q: InCI() = %v", v, !want)
		}
	}
}

// recorder is a testing.TB that records Skip and Fatal instead of acting.
type recorder struct {
	testing.TB
	skipped, failed string
}

func (r *recorder) Helper()                   {}
func (r *recorder) Skip(args ...any)          { r.skipped = fmt.Sprint(args...) }
func (r *recorder) Fatalf(f string, a ...any) { r.failed = fmt.Sprintf(f, a...) }

func TestSkipOrFail(t *testing.T) {
	t.Setenv("CI", "")
	r := &recorder{TB: t}
	Check(r, fmt.Errorf("wrapped: %w", pgcluster.ErrNoBinaries))
	if r.skipped == "" || r.failed != "" {
		t.Fatalf("outside CI missing binaries must skip: %+v", r)
	}
	t.Setenv("CI", "1")
	r = &recorder{TB: t}
	Check(r, pgcluster.ErrNotRoot)
	if r.failed == "" || r.skipped != "" {
		t.Fatalf("under CI missing binaries must fail: %+v", r)
	}
	t.Setenv("CI", "")
	r = &recorder{TB: t}
	Check(r, fmt.Errorf("initdb: exit status 1"))
	if r.failed == "" {
		t.Fatalf("a real start failure must fail even outside CI: %+v", r)
	}
}
