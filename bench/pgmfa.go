package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/loop/tlsproxy/testpki"
)

// The users the suite logs in as. benchWaitUser never sends a code: its
// sessions are the ones that wait for MFA approval.
const (
	benchUser     = "bench"
	benchWaitUser = "bench_wait"
	benchPassword = "bench-pw-not-secret"
	benchDB       = "bench"
	// benchStoreUser owns the pgmfa-pgstore path's store databases.
	benchStoreUser = "pgmfa_store"
)

// findPgmfa returns the pgmfa binary: -pgmfa when given, else
// cmd/pgmfa/bin/pgmfa (make build) in the repository, else one built now into tmp with go build.
func findPgmfa(ctx context.Context, flagPath, repo, tmp string) (string, error) {
	if flagPath != "" {
		if _, err := os.Stat(flagPath); err != nil {
			return "", fmt.Errorf("-pgmfa: %w", err)
		}
		return filepath.Abs(flagPath)
	}
	def := filepath.Join(repo, "cmd", "pgmfa", "bin", "pgmfa")
	if _, err := os.Stat(def); err == nil {
		return def, nil
	}
	out := filepath.Join(tmp, "pgmfa")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/pgmfa")
	cmd.Dir = repo
	if b, err := cmd.CombinedOutput(); err != nil {
		// The first line of the compiler's complaint is the useful one.
		msg := strings.TrimSpace(string(b))
		for _, l := range strings.Split(msg, "\n") {
			if !strings.HasPrefix(l, "#") && l != "" {
				msg = l
				break
			}
		}
		return "", fmt.Errorf("no pgmfa binary (make build) and go build ./cmd/pgmfa failed: %v: %s", err, msg)
	}
	return out, nil
}

// pgmfaVersion asks the binary for its version, for the JSON file.
func pgmfaVersion(bin string) string {
	b, err := exec.Command(bin, "version").Output()
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	return strings.TrimSpace(string(b))
}

// startPgmfa starts one pgmfa serve for a path: its own store (so replay
// protection of one proxy cannot affect another), its own admin socket and
// log. --mfa-remember lets one code cover all of pgbench's connections from
// 127.0.0.1. User flags come last so they override the suite's. pki is the
// suite's certificates, used by the TLS path only.
func startPgmfa(ps *procs, bin, name string, cl *pgcluster.Cluster, dir string, pki *testpki.PKI, extra []string) *endpoint {
	ep := &endpoint{Name: name, Host: "127.0.0.1", TLS: isTLS(name)}
	if ep.TLS && pki == nil {
		ep.Err = fmt.Errorf("no certificates for client TLS")
		return ep
	}
	if bin == "" {
		ep.Err = fmt.Errorf("no pgmfa binary")
		return ep
	}
	if ep.Err = os.MkdirAll(dir, 0o700); ep.Err != nil {
		return ep
	}
	store, storeFlags := filepath.Join(dir, "store.json"), []string(nil)
	if name == pathPgstore {
		// A database of its own in the benchmark's cluster, per instance
		// (Fresh), so that no instance inherits another's replay or
		// remember state.
		var keyFile string
		if store, ep.Err = createStoreDatabase(cl, filepath.Base(dir)); ep.Err != nil {
			return ep
		}
		if keyFile, ep.Code, ep.Err = enrollPgstore(store, dir, benchUser, benchWaitUser); ep.Err != nil {
			return ep
		}
		storeFlags = []string{"--store-key-file", keyFile}
	} else if ep.Code, ep.Err = enrollTOTP(store, benchUser, benchWaitUser); ep.Err != nil {
		return ep
	}
	if ep.Port, ep.Err = pgcluster.FreePort(); ep.Err != nil {
		return ep
	}
	upstream, splice := cl.Addr(), "sockmap"
	switch name {
	case pathSockmapUnix:
		upstream = cl.SocketPath()
	case pathRelay:
		splice = "off"
	case pathPgmfaTLS:
		// TLS sessions are relayed in user space whatever --splice says;
		// off keeps the path free of the BPF requirement.
		splice = "off"
	}
	args := []string{"serve",
		"--listen", ep.Addr(),
		"--upstream", upstream,
		"--store", store,
		"--admin", filepath.Join(dir, "admin.sock"),
		"--splice", splice,
		"--mfa-remember", "1h",
		// Opening -sessions logins that wait for approval can take longer
		// than the default minute on a small machine; none may time out
		// before the memory is read.
		"--mfa-timeout", "10m",
		"--loops", strconv.Itoa(runtime.NumCPU()),
		// One "login timing" line per login: the login-latency breakdown.
		"--log-level", "debug",
		// The suite stops its processes with SIGTERM, which drains by
		// default: logins left waiting for approval (mfa-wait-rss) held
		// the drain until the suite gave up and killed pgmfa.
		"--drain-timeout", "0",
	}
	args = append(args, storeFlags...)
	if ep.TLS {
		args = append(args, "--tls-cert", pki.CertFile, "--tls-key", pki.KeyFile, "--tls", "require")
	}
	args = append(args, extra...)
	startServer(ps, ep, "pgmfa", dir, "pgmfa.log", bin, args...)
	return ep
}

// startServer starts a path's own process in dir with its output in
// dir/logName, records it in ep (or why it failed in ep.Err) and waits
// until it listens on ep.Addr().
func startServer(ps *procs, ep *endpoint, what, dir, logName, bin string, args ...string) {
	ep.LogFile = filepath.Join(dir, logName)
	logf, err := os.Create(ep.LogFile)
	if err != nil {
		ep.Err = err
		return
	}
	defer logf.Close() // the child keeps its own descriptor
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	ep.CmdLine = cmd.Args
	if ep.Err = ps.start(cmd); ep.Err != nil {
		return
	}
	ep.Cmd = cmd
	if err := ps.waitListening(cmd, ep.Addr(), 15*time.Second); err != nil {
		ep.Err = fmt.Errorf("%s %v; log:\n%s", what, err, tail(ep.LogFile, 1500))
	}
}

// createStoreDatabase creates a database for a pgmfa-pgstore instance in
// the benchmark's cluster, owned by benchStoreUser, and returns the
// store's connection string (TCP with SCRAM, as a store across the network
// is reached; pgmfa pools the connections).
func createStoreDatabase(cl *pgcluster.Cluster, instance string) (string, error) {
	db := "pgmfa_" + strings.NewReplacer("-", "_", ".", "_").Replace(instance)
	if _, err := cl.Psql(fmt.Sprintf("DROP DATABASE IF EXISTS %s;\nCREATE DATABASE %s OWNER %s;", db, db, benchStoreUser)); err != nil {
		return "", fmt.Errorf("create the store's database: %w", err)
	}
	return cl.DSN(benchStoreUser, benchPassword, db), nil
}
