package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/loop/tlsproxy/testpki"
)

// env is everything a run has started: the cluster, the proxies and their
// temporary directory. close undoes all of it.
type env struct {
	cfg       *config
	tmp       string
	cluster   *pgcluster.Cluster
	procs     procs
	endpoints map[string]*endpoint
	pgmfaBin  string
	pki       *testpki.PKI // certificates of the TLS paths; nil without them
	logf      func(format string, args ...any)
	// copyInSums caches copyInChecksum by row count (computed once a run).
	copyInSums map[int64]string
}

// setup starts PostgreSQL (loaded with pgbench -i) and every selected path.
// A path that fails to start is recorded in its endpoint and measured as an
// error; only a failing database aborts the run.
func setup(ctx context.Context, cfg *config, repo string, logf func(string, ...any)) (e *env, err error) {
	e = &env{cfg: cfg, endpoints: map[string]*endpoint{}, logf: logf}
	defer func() {
		if err != nil {
			e.close()
			e = nil
		}
	}()
	if e.tmp, err = os.MkdirTemp("", "pgmfa-bench-"); err != nil {
		return e, err
	}
	// pgbouncer runs as postgres and must reach its own subdirectory.
	if err = os.Chmod(e.tmp, 0o711); err != nil {
		return e, err
	}
	pgmfaFlags := cfg.PgmfaFlags
	if slices.ContainsFunc(cfg.Workloads, isSessionWorkload) {
		// Before any child starts: they inherit it.
		fl, lerr := raiseFileLimit(cfg.Sessions)
		if lerr != nil {
			return e, lerr
		}
		if fl.Log != "" {
			logf("%s", fl.Log)
		}
		if fl.MaxConns > 0 {
			// Before the user's flags, which may override it.
			pgmfaFlags = append([]string{"--max-conns", strconv.Itoa(fl.MaxConns)}, pgmfaFlags...)
		}
	}
	logf("starting PostgreSQL (scale %d)", cfg.Scale)
	e.cluster, err = pgcluster.Start(pgcluster.Options{
		Method: pgcluster.ScramSHA256,
		Users: []pgcluster.User{
			{Name: benchUser, Password: benchPassword},
			{Name: benchWaitUser, Password: benchPassword},
			{Name: benchStoreUser, Password: benchPassword},
		},
		Databases: []string{benchDB},
		Settings: map[string]string{
			// Room for the held sessions, plus pgbouncer's pool draining.
			"max_connections": strconv.Itoa(cfg.Sessions + 200),
		},
	})
	if err != nil {
		return e, fmt.Errorf("start PostgreSQL: %w", err)
	}
	if err = e.loadPgbench(ctx); err != nil {
		return e, err
	}
	var pkiErr error
	if slices.ContainsFunc(cfg.Paths, isTLS) {
		if e.pki, pkiErr = testpki.New(); pkiErr != nil {
			logf("TLS certificates unavailable: %v", pkiErr)
			e.pki = nil
		}
	}
	for _, p := range cfg.Paths {
		if isTLS(p) && pkiErr != nil {
			e.endpoints[p] = &endpoint{Name: p, TLS: true, Err: fmt.Errorf("TLS certificates: %w", pkiErr)}
		}
	}
	for _, p := range cfg.Paths {
		if isPgmfa(p) && e.pgmfaBin == "" && e.endpoints[p] == nil {
			var berr error
			if e.pgmfaBin, berr = findPgmfa(ctx, cfg.Pgmfa, repo, e.tmp); berr != nil {
				logf("pgmfa unavailable: %v", berr)
				for _, q := range cfg.Paths {
					if isPgmfa(q) && e.endpoints[q] == nil {
						e.endpoints[q] = &endpoint{Name: q, Err: berr}
					}
				}
			}
		}
	}
	for _, p := range cfg.Paths {
		if e.endpoints[p] != nil {
			continue
		}
		logf("starting path %s", p)
		var ep *endpoint
		switch {
		case p == pathDirect:
			ep = &endpoint{Name: p, Host: e.cluster.Host, Port: e.cluster.Port}
		case p == pathBare:
			ep = startBare(&e.procs, e.cluster, filepath.Join(e.tmp, p))
		case isPgbouncer(p):
			ep = startPgbouncer(&e.procs, p, e.cluster, filepath.Join(e.tmp, p), e.pki, []string{benchUser, benchWaitUser}, cfg.Sessions)
		default:
			ep = startPgmfa(&e.procs, e.pgmfaBin, p, e.cluster, filepath.Join(e.tmp, p), e.pki, pgmfaFlags)
			fresh := 0
			ep.Fresh = func() *endpoint {
				fresh++
				return startPgmfa(&e.procs, e.pgmfaBin, p, e.cluster, filepath.Join(e.tmp, fmt.Sprintf("%s-fresh%d", p, fresh)), e.pki, pgmfaFlags)
			}
		}
		if ep.Err != nil {
			logf("path %s failed to start: %v", p, ep.Err)
		}
		e.endpoints[p] = ep
	}
	return e, ctx.Err()
}

// loadPgbench creates pgbench's tables as the superuser over the socket
// and lets the bench user read them; it also creates the copy-in table.
func (e *env) loadPgbench(ctx context.Context) error {
	bin := filepath.Join(e.cluster.BinDir, "pgbench")
	if _, err := os.Stat(bin); err != nil {
		bin = "pgbench"
	}
	cmd := exec.CommandContext(ctx, bin, "-i", "-q", "-s", strconv.Itoa(e.cfg.Scale),
		"-h", e.cluster.SocketDir, "-p", strconv.Itoa(e.cluster.Port), "-U", pgcluster.Superuser, benchDB)
	cmd.Env = append(os.Environ(), "PGOPTIONS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench -i: %v\n%s", err, strings.TrimSpace(string(out)))
	}
	_, err := e.cluster.PsqlDB(benchDB, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO "+benchUser+";\n"+copyInDDL)
	return err
}

// close stops every process by PID and removes the temporary files unless
// -keep.
func (e *env) close() {
	e.procs.stopAll()
	if e.pki != nil && !e.cfg.Keep {
		e.pki.Close()
	}
	if e.cluster != nil {
		if e.cfg.Keep {
			os.Setenv("PGCLUSTER_KEEP", "1")
		}
		if err := e.cluster.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "bench: stop PostgreSQL: %v\n", err)
		}
	}
	if e.tmp == "" {
		return
	}
	if e.cfg.Keep {
		fmt.Fprintf(os.Stderr, "bench: kept %s (pgmfa/pgbouncer logs and stores)", e.tmp)
		if e.pki != nil {
			fmt.Fprintf(os.Stderr, ", the TLS certificates in %s", e.pki.Dir)
		}
		if e.cluster != nil {
			fmt.Fprintf(os.Stderr, " and the cluster's data in %s", filepath.Dir(e.cluster.DataDir))
		}
		fmt.Fprintln(os.Stderr)
		return
	}
	os.RemoveAll(e.tmp)
}
