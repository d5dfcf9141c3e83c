package main

import (
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// config is everything the command line decides.
type config struct {
	Paths      []string      `json:"paths"`
	Workloads  []string      `json:"workloads"`
	Duration   time.Duration `json:"duration_ns"`
	Rounds     int           `json:"rounds"`
	MaxRounds  int           `json:"max_rounds"`
	Spread     float64       `json:"spread"`
	Scale      int           `json:"scale"`
	Clients    []int         `json:"clients"`
	BulkMB     int           `json:"bulk_mb"`
	Sessions   int           `json:"sessions"`
	Pgmfa      string        `json:"pgmfa"`
	PgmfaFlags []string      `json:"pgmfa_flags"`
	Out        string        `json:"out"`
	Smoke      bool          `json:"smoke"`
	Keep       bool          `json:"keep"`
}

const usageHead = `pgmfa benchmark suite: direct PostgreSQL vs pgmfa (each relay mode)
vs pgbouncer, and both with TLS to the client.

It starts a scratch PostgreSQL, pgbouncer and one pgmfa per pgmfa path, then
measures every workload on every path round by round, so each path is compared
with a direct connection measured moments earlier. Figures are the median of
the rounds with min and max; "x direct" is the median of per-round ratios
(1.00 = as good as direct, lower is worse; for latency it is direct/path).

Writes a table to stdout, results.json (every raw figure and the machine) and
ratios.svg into -out.

usage: go run ./bench [flags]      (or: make bench BENCHFLAGS='...')

flags:
`

// parseConfig parses args. It returns flag.ErrHelp for -h/--help.
func parseConfig(args []string, stderr io.Writer) (*config, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		paths     = fs.String("paths", "all", "comma-separated paths to measure: "+strings.Join(allPaths, ", ")+" (all: every one)")
		workloads = fs.String("workloads", "all", "comma-separated workloads (all: every one); names: "+strings.Join(workloadNames([]int{1, 16, 64}), ", ")+"; select-N follows -clients")
		duration  = fs.Duration("duration", 8*time.Second, "length of each timed run (pgbench -T, login-latency loop)")
		rounds    = fs.Int("rounds", 3, "rounds at least; every figure is the median of the rounds, with min and max")
		maxRounds = fs.Int("max-rounds", 8, "rounds at most: after -rounds, a workload gets further rounds (all its paths again, interleaved) while any of its ratios is spread wider than -spread")
		spread    = fs.Float64("spread", 0.03, "target spread of a ratio: the median absolute deviation of its per-round values; wider figures get more rounds, and are marked too noisy to read when -max-rounds did not bring them under it")
		scale     = fs.Int("scale", 20, "pgbench scale factor (pgbench -i -s N; 20 is ~300 MB)")
		clients   = fs.String("clients", "1,16,64", "client counts for the pgbench -S workloads (one workload select-N each); -j is min(N, cores)")
		bulkMB    = fs.Int("bulk-mb", 500, "size in MB of the copy-out (COPY TO STDOUT) and copy-in (COPY FROM STDIN into an unlogged table, truncated before each run and verified by row count and checksum after) workloads; select-bulk returns 3/5 of it")
		sessions  = fs.Int("sessions", 1000, "sessions held open for the idle-rss and mfa-wait-rss workloads (PostgreSQL max_connections and the open-file limit are raised to fit; 10000 is the issue's figure, ~25 min per workload on 2 cores and ~17 GiB for the backends)")
		pgmfa     = fs.String("pgmfa", "", "pgmfa binary (default: cmd/pgmfa/bin/pgmfa in the repository (make build), built with go build when missing)")
		pgmfaFl   = fs.String("pgmfa-flags", "", "extra flags appended to every pgmfa serve command line, space-separated (e.g. '--loops 1 --socket-buffer 4194304'); later flags override the suite's")
		out       = fs.String("out", "", "output directory (default bench/out/<UTC timestamp>)")
		smoke     = fs.Bool("smoke", false, "tiny run (1 s runs, 1 round, scale 1, 20 MB bulk, 50 sessions) that fails when any selected path/workload produced no figure; flags given explicitly still win")
		keep      = fs.Bool("keep", false, "keep temporary directories (cluster, pgbouncer, pgmfa logs and stores) and print where they are")
	)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageHead)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q (flags only)", fs.Args())
	}
	if *smoke {
		// Smoke values only where the user did not choose.
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		def := func(name string, apply func()) {
			if !set[name] {
				apply()
			}
		}
		def("duration", func() { *duration = time.Second })
		def("rounds", func() { *rounds = 1 })
		def("max-rounds", func() { *maxRounds = 1 })
		def("scale", func() { *scale = 1 })
		def("bulk-mb", func() { *bulkMB = 20 })
		def("sessions", func() { *sessions = 50 })
	}
	c := &config{Duration: *duration, Rounds: *rounds, MaxRounds: max(*maxRounds, *rounds), Spread: *spread, Scale: *scale, BulkMB: *bulkMB, Sessions: *sessions,
		Pgmfa: *pgmfa, PgmfaFlags: strings.Fields(*pgmfaFl), Out: *out, Smoke: *smoke, Keep: *keep}
	var err error
	if c.Clients, err = parseInts(*clients); err != nil {
		return nil, fmt.Errorf("-clients: %w", err)
	}
	if c.Paths, err = pick(*paths, allPaths); err != nil {
		return nil, fmt.Errorf("-paths: %w", err)
	}
	if c.Workloads, err = pick(*workloads, workloadNames(c.Clients)); err != nil {
		return nil, fmt.Errorf("-workloads: %w", err)
	}
	switch {
	case c.Duration < 100*time.Millisecond:
		return nil, fmt.Errorf("-duration %v is too short", c.Duration)
	case c.Rounds < 1 || c.Scale < 1 || c.BulkMB < 1 || c.Sessions < 1:
		return nil, fmt.Errorf("-rounds, -scale, -bulk-mb and -sessions must be at least 1")
	case !(c.Spread > 0):
		return nil, fmt.Errorf("-spread must be above 0")
	}
	return c, nil
}

// pick resolves a comma list against the known names, keeping their order.
func pick(list string, known []string) ([]string, error) {
	if strings.TrimSpace(list) == "all" || strings.TrimSpace(list) == "" {
		return append([]string(nil), known...), nil
	}
	want := map[string]bool{}
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		found := false
		for _, k := range known {
			found = found || k == n
		}
		if !found {
			return nil, fmt.Errorf("unknown name %q (known: %s)", n, strings.Join(known, ", "))
		}
		want[n] = true
	}
	var out []string
	for _, k := range known {
		if want[k] {
			out = append(out, k)
		}
	}
	return out, nil
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive number", f)
		}
		out = append(out, n)
	}
	return out, nil
}
