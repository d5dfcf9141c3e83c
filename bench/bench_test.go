package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
)

// TestSmoke runs the smoke harness on the paths that need nothing from
// pgmfa itself: direct and pgbouncer. The pgmfa paths are exercised by
// `make bench-smoke`.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL and pgbouncer; skipped with -short")
	}
	need := func(ok bool, why string) {
		t.Helper()
		if !ok {
			pgtest.SkipOrFail(t, "%s", why)
		}
	}
	_, err := pgcluster.BinDir()
	need(!errors.Is(err, pgcluster.ErrNoBinaries), "PostgreSQL server binaries not installed (make deps-pg)")
	need(os.Geteuid() == 0, "needs root: the cluster runs as postgres and pgbouncer is started as postgres")
	_, err = exec.LookPath("pgbouncer")
	if err != nil {
		_, err = os.Stat("/usr/sbin/pgbouncer")
	}
	need(err == nil, "pgbouncer not installed (make deps-bench)")

	out := t.TempDir()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"-smoke", "-paths", "direct,pgbouncer", "-out", out}, &stdout, &stderr)
	t.Logf("stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	if code != 0 {
		t.Fatalf("smoke run exited %d", code)
	}
	if !strings.Contains(stdout.String(), "smoke: every selected path produced figures") {
		t.Error("smoke run did not confirm its figures")
	}
	b, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Machine struct{ Cores int }
		Results []struct {
			Workload, Path string
			Value          struct{ N int }
		}
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Machine.Cores == 0 || len(rep.Results) == 0 {
		t.Errorf("results.json lacks the machine or the results: %s", b)
	}
	if svg, err := os.ReadFile(filepath.Join(out, "ratios.svg")); err != nil || !bytes.Contains(svg, []byte("<svg")) {
		t.Errorf("ratios.svg missing or empty: %v", err)
	}
}
