// Command pgmfa-demo is `make run`: it starts a throwaway PostgreSQL,
// creates and enrolls a demo user, and runs `pgmfa serve` in front of it in
// the foreground, until Ctrl-C.
//
// It is a separate binary so that the shipped pgmfa links neither the
// cluster harness (which runs initdb as the postgres user) nor anything
// that harness pulls in: the demo drives pgmfa the way a user would, through
// its `enroll` and `serve` subcommands.
package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
)

const usage = `usage: pgmfa-demo [--pgmfa PATH] [--user NAME] [serve flags]

Starts a throwaway PostgreSQL (scram-sha-256), creates a user and database,
enrolls the user for TOTP in a temporary store, runs pgmfa serve in the
foreground and prints a ready-to-paste psql line. Ctrl-C stops everything
it started and removes the temporary files. Every other flag is passed to
pgmfa serve (pgmfa serve --help lists them).

  --pgmfa PATH   the pgmfa binary (default: pgmfa beside this program, else on PATH)
  --user NAME    the demo user, also its password and database (default demo)
`

func main() { os.Exit(run(os.Args[1:])) }

func run(args []string) int {
	pgmfa, user, serveArgs, err := parseArgs(args)
	if errors.Is(err, errHelp) {
		fmt.Print(usage)
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "pgmfa-demo: %v\n\n%s", err, usage)
		return 2
	}
	if pgmfa, err = findPgmfa(pgmfa); err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa-demo:", err)
		return 1
	}
	// Piped into tee or less, Ctrl-C kills the reader too; a line written
	// after that must not kill us (SIGPIPE) before the scratch database is
	// stopped.
	signal.Ignore(syscall.SIGPIPE)
	// Ctrl-C reaches the whole foreground process group: serve stops on its
	// own; the demo waits for it and then cleans up.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)

	fmt.Fprintln(os.Stderr, "starting a scratch PostgreSQL ...")
	pg, err := pgcluster.Start(pgcluster.Options{
		Method:    pgcluster.ScramSHA256,
		Users:     []pgcluster.User{{Name: user, Password: user}},
		Databases: []string{user},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa-demo:", err)
		return 1
	}
	defer pg.Stop()
	if _, err := pg.Psql(fmt.Sprintf("ALTER DATABASE %s OWNER TO %s",
		pgcluster.QuoteIdent(user), pgcluster.QuoteIdent(user))); err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa-demo:", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "pgmfa-demo-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa-demo:", err)
		return 1
	}
	defer os.RemoveAll(dir)

	// Defaults for what the user did not set: a private store and admin
	// socket, this cluster, a free port when 6432 is taken, no remember.
	store, ok := flagValue(serveArgs, "store")
	if !ok {
		store = filepath.Join(dir, "totp.json")
		serveArgs = append(serveArgs, "--store", store)
	}
	admin, ok := flagValue(serveArgs, "admin")
	if !ok {
		admin = filepath.Join(dir, "admin.sock")
		serveArgs = append(serveArgs, "--admin", admin)
	}
	if _, ok := flagValue(serveArgs, "upstream"); !ok {
		serveArgs = append(serveArgs, "--upstream", pg.Addr())
	}
	listen, ok := flagValue(serveArgs, "listen")
	if !ok {
		listen = "127.0.0.1:6432"
		if !portFree(listen) {
			port, err := pgcluster.FreePort()
			if err != nil {
				fmt.Fprintln(os.Stderr, "pgmfa-demo:", err)
				return 1
			}
			listen = "127.0.0.1:" + strconv.Itoa(port)
		}
		serveArgs = append(serveArgs, "--listen", listen)
	}
	if _, ok := flagValue(serveArgs, "mfa-remember"); !ok {
		serveArgs = append(serveArgs, "--mfa-remember", "0")
	}

	enroll := exec.Command(pgmfa, "enroll", "--store", store, "--issuer", "pgmfa-demo", user)
	enroll.Stdin, enroll.Stdout, enroll.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := enroll.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa-demo: pgmfa enroll:", err)
		return 1
	}

	serve := exec.Command(pgmfa, append([]string{"serve"}, serveArgs...)...)
	serve.Stdout, serve.Stderr = os.Stdout, os.Stderr
	if err := serve.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa-demo: pgmfa serve:", err)
		return 1
	}
	done := make(chan error, 1)
	go func() { done <- serve.Wait() }()

	first := strings.Split(listen, ",")[0]
	host, port, _ := net.SplitHostPort(first)
	if waitListening(first, done) {
		fmt.Printf(`
pgmfa is listening on %s, in front of PostgreSQL at %s.
Scan the QR code above with an authenticator app, or let pgmfa compute the code:

  PGPASSWORD=%s PGOPTIONS="-c pgmfa.code=$(%s code --store %s %s)" \
    psql "host=%s port=%s user=%s dbname=%s sslmode=disable"

Without a code the login waits; release it from another terminal with
  %s approve --admin %s %s CODE

Ctrl-C stops the proxy and the scratch database.
`, listen, pg.Addr(), user, pgmfa, store, user, host, port, user, user, pgmfa, admin, user)
	}
	for {
		select {
		case err := <-done:
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return ee.ExitCode()
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, "pgmfa-demo: pgmfa serve:", err)
				return 1
			}
			return 0
		case s := <-sigs:
			// Passed on in case it came from kill rather than the terminal.
			_ = serve.Process.Signal(s)
		}
	}
}

var errHelp = errors.New("help")

// parseArgs takes the demo's own flags out of args (Go flag syntax: -x or
// --x, "--x v" or "--x=v") and leaves the rest for pgmfa serve.
func parseArgs(args []string) (pgmfa, user string, rest []string, err error) {
	user = "demo"
	for i := 0; i < len(args); i++ {
		a := args[i]
		name := strings.TrimLeft(a, "-")
		if name == a || name == "" {
			rest = append(rest, a)
			continue
		}
		key, val, hasVal := strings.Cut(name, "=")
		switch key {
		case "h", "help":
			return "", "", nil, errHelp
		case "pgmfa", "user":
			if !hasVal {
				if i+1 >= len(args) {
					return "", "", nil, fmt.Errorf("flag needs an argument: %s", a)
				}
				i++
				val = args[i]
			}
			if key == "pgmfa" {
				pgmfa = val
			} else {
				user = val
			}
		default:
			rest = append(rest, a)
		}
	}
	if user == "" {
		return "", "", nil, errors.New("--user must not be empty")
	}
	return pgmfa, user, rest, nil
}

// flagValue finds --name (or -name) in serve's arguments.
func flagValue(args []string, name string) (string, bool) {
	for i, a := range args {
		key, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if key != name || !strings.HasPrefix(a, "-") {
			continue
		}
		if hasVal {
			return val, true
		}
		if i+1 < len(args) {
			return args[i+1], true
		}
		return "", true
	}
	return "", false
}

// findPgmfa resolves the pgmfa binary: the flag, then a pgmfa beside this
// program, then PATH.
func findPgmfa(flagged string) (string, error) {
	if flagged != "" {
		return filepath.Abs(flagged)
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "pgmfa")
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	p, err := exec.LookPath("pgmfa")
	if err != nil {
		return "", errors.New("pgmfa binary not found: build it (make build) and pass --pgmfa PATH")
	}
	return filepath.Abs(p)
}

func portFree(addr string) bool {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	return true
}

// waitListening waits until serve accepts on addr (a TCP address; a unix
// socket path is not waited for), or serve has exited.
func waitListening(addr string, exited chan error) bool {
	if strings.HasPrefix(addr, "/") {
		return true
	}
	for i := 0; i < 200; i++ {
		select {
		case err := <-exited:
			exited <- err
			return false
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}
