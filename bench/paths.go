package main

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
)

// Path names. Their order is the order of the table and the chart.
const (
	pathDirect       = "direct"
	pathBare         = "sockmap-bare"
	pathSockmap      = "pgmfa-sockmap"
	pathSockmapUnix  = "pgmfa-sockmap-unix"
	pathRelay        = "pgmfa-relay"
	pathPgstore      = "pgmfa-pgstore"
	pathPgbouncer    = "pgbouncer"
	pathPgmfaTLS     = "pgmfa-tls"
	pathPgbouncerTLS = "pgbouncer-tls"
)

var allPaths = []string{pathDirect, pathBare, pathSockmap, pathSockmapUnix, pathRelay, pathPgstore, pathPgbouncer, pathPgmfaTLS, pathPgbouncerTLS}

// pathDescriptions say what each path is, for the JSON file and --help.
var pathDescriptions = map[string]string{
	pathDirect:       "TCP straight to PostgreSQL (the limit)",
	pathBare:         "a bare sockmap pair: accept, connect, splice at once with a redirect-only verdict, no proxy logic (the kernel's floor; the login is spliced too)",
	pathSockmap:      "pgmfa --splice sockmap, TCP upstream",
	pathSockmapUnix:  "pgmfa --splice sockmap, unix-socket upstream",
	pathRelay:        "pgmfa --splice off (user-space relay), TCP upstream",
	pathPgstore:      "pgmfa --splice sockmap with its MFA state in PostgreSQL (--store postgres://, a database of the benchmark's cluster, secrets encrypted); login workloads only",
	pathPgbouncer:    "pgbouncer, session mode, scram-sha-256, TCP upstream",
	pathPgmfaTLS:     "pgmfa --tls require --splice off (clients sslmode=require; TLS is relayed in user space, never spliced), TCP upstream",
	pathPgbouncerTLS: "pgbouncer, session mode, client_tls_sslmode=require (clients sslmode=require), TCP upstream",
}

// isPgmfa reports whether a path goes through pgmfa.
func isPgmfa(path string) bool { return path != pathDirect && path != pathBare && !isPgbouncer(path) }

// isPgbouncer reports whether a path goes through pgbouncer.
func isPgbouncer(path string) bool { return path == pathPgbouncer || path == pathPgbouncerTLS }

// loginOnly reports whether a path is measured by the login workloads
// alone: the PostgreSQL store changes the login, not the spliced session.
func loginOnly(path string) bool { return path == pathPgstore }

// isTLS reports whether a path's clients connect with TLS (sslmode=require).
func isTLS(path string) bool { return path == pathPgmfaTLS || path == pathPgbouncerTLS }

// endpoint is where a path's clients connect, and the process (if any)
// whose CPU and memory the path costs.
type endpoint struct {
	Name    string
	Host    string
	Port    int
	Cmd     *exec.Cmd // pgmfa or pgbouncer; nil for direct
	CmdLine []string  // for the JSON file
	LogFile string
	// Code returns the TOTP code for a user; nil when the path has no MFA.
	Code func(user string) (string, error)
	// Drain, when set, releases server connections a pooler keeps after
	// clients leave.
	Drain func(ctx context.Context) error
	// Fresh, when set, starts another instance of the path's process (same
	// flags, own port and store) for measurements that need a process
	// without the history of earlier workloads.
	Fresh func() *endpoint
	// TLS is set when clients must connect with sslmode=require.
	TLS bool
	// Err is why the path could not be started; its rows then show it.
	Err error
}

// sslmode is the libpq sslmode the path's clients use.
func (e *endpoint) sslmode() string {
	if e.TLS {
		return "require"
	}
	return "disable"
}

// Addr is host:port.
func (e *endpoint) Addr() string { return e.Host + ":" + strconv.Itoa(e.Port) }

// PID is the path's own process, 0 for direct.
func (e *endpoint) PID() int {
	if e.Cmd == nil || e.Cmd.Process == nil {
		return 0
	}
	return e.Cmd.Process.Pid
}

// options is the PGOPTIONS value that carries the MFA code for user, or ""
// on paths without MFA.
func (e *endpoint) options(user string) (string, error) {
	if e.Code == nil {
		return "", nil
	}
	code, err := e.Code(user)
	if err != nil {
		return "", fmt.Errorf("TOTP code: %w", err)
	}
	return "-c pgmfa.code=" + code, nil
}
