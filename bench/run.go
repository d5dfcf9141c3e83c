package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// run is the whole suite; it returns the exit code: 0, 1 when a smoke run
// lacks figures or the run failed, 2 for bad flags.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg, err := parseConfig(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "bench: %v\n", err)
		return 2
	}
	repo := repoRoot()
	if cfg.Out == "" {
		cfg.Out = filepath.Join(repo, "bench", "out", time.Now().UTC().Format("20060102-150405"))
	}
	prog := newProgress(stderr)
	started := time.Now().UTC()

	e, err := setup(ctx, cfg, repo, prog.log)
	if err != nil {
		fmt.Fprintf(stderr, "bench: %v\n", err)
		return 1
	}
	// Everything started is stopped by PID, also after Ctrl-C (ctx) or a panic.
	defer e.close()

	res := measureAll(ctx, e, prog)
	prog.finish()
	if ctx.Err() != nil {
		fmt.Fprintln(stderr, "bench: interrupted; writing what was measured")
	}

	rep := &Report{Started: started, Finished: time.Now().UTC(), Machine: describeMachine(e), Config: cfg, Rows: res.Rows, Notes: reportNotes}
	for _, p := range cfg.Paths {
		ep := e.endpoints[p]
		pi := PathInfo{Name: p, Desc: pathDescriptions[p], CmdLine: ep.CmdLine}
		if ep.Err != nil {
			pi.Error = ep.Err.Error()
		}
		rep.Paths = append(rep.Paths, pi)
	}
	for _, w := range selectedWorkloads(cfg) {
		rep.Workloads = append(rep.Workloads, WorkloadInfo{Name: w.Name, Unit: w.Unit, HigherBetter: w.HigherBetter, Desc: w.Desc})
	}

	fmt.Fprintf(stdout, "pgmfa bench: %d cores, kernel %s, %s; %d to %d round(s) of %v (target spread %.2f), scale %d\n\n",
		rep.Machine.Cores, rep.Machine.Kernel, shortPG(rep.Machine.PostgreSQL), cfg.Rounds, cfg.MaxRounds, cfg.Duration, cfg.Spread, cfg.Scale)
	writeTable(stdout, res, cfg)
	writeBreakdown(stdout, res)
	writeVerdicts(stdout, res, cfg)

	code := 0
	jsonPath, svgPath := filepath.Join(cfg.Out, "results.json"), filepath.Join(cfg.Out, "ratios.svg")
	if err := writeJSON(jsonPath, rep); err != nil {
		fmt.Fprintf(stderr, "bench: %v\n", err)
		code = 1
	}
	subtitle := fmt.Sprintf("%s; %d cores, kernel %s, %s; %d round(s) x %v, scale %d",
		started.Format("2006-01-02 15:04 UTC"), rep.Machine.Cores, rep.Machine.Kernel, shortPG(rep.Machine.PostgreSQL), cfg.Rounds, cfg.Duration, cfg.Scale)
	svg := renderSVG(res, cfg.Paths, "pgmfa benchmark: each path relative to a direct connection", subtitle)
	if err := os.WriteFile(svgPath, svg, 0o644); err != nil {
		fmt.Fprintf(stderr, "bench: %v\n", err)
		code = 1
	}
	fmt.Fprintf(stdout, "\nwrote %s\n      %s\n", jsonPath, svgPath)

	if ctx.Err() != nil {
		return 1
	}
	if cfg.Smoke {
		if missing := missingFigures(res, cfg); len(missing) > 0 {
			fmt.Fprintf(stderr, "bench: smoke FAILED; no figure (see errors above) for\n  %s\n", strings.Join(missing, "\n  "))
			return 1
		}
		fmt.Fprintln(stdout, "smoke: every selected path produced figures")
	}
	return code
}

// missingFigures lists, per path, the workloads that should have a figure
// and have none (the errors section above the message says why).
func missingFigures(res *Results, cfg *config) []string {
	var out []string
	for _, p := range cfg.Paths {
		var ws []string
		for _, w := range selectedWorkloads(cfg) {
			if r := res.find(w.Name, p); w.Applies(p) && (r == nil || r.Value.N == 0) {
				ws = append(ws, w.Name)
			}
		}
		if len(ws) > 0 {
			out = append(out, p+": "+strings.Join(ws, ", "))
		}
	}
	return out
}

// shortPG turns "PostgreSQL 15.18 (Debian ...) on x86_64..." into "PostgreSQL 15.18".
func shortPG(v string) string {
	f := strings.Fields(v)
	if len(f) >= 2 {
		return f[0] + " " + f[1]
	}
	return v
}

// repoRoot finds the module root (go.mod of github.com/pgmfa/pgmfa) from
// the working directory upwards; the working directory when not found.
func repoRoot() string {
	wd, _ := os.Getwd()
	for d := wd; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && strings.Contains(string(b), "module github.com/pgmfa/pgmfa\n") {
			return d
		}
		if filepath.Dir(d) == d {
			return wd
		}
	}
}
