package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
)

func init() {
	register("demo", "start a scratch PostgreSQL, enroll a demo user and run the proxy in front of it (make run)", runDemo)
}

// runDemo is `make run`: everything a newcomer needs to see pgmfa work, on a
// fresh machine, stopped by Ctrl-C.
func runDemo(args []string) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	var f serveFlags
	f.register(fs)
	user := fs.String("user", "demo", "the demo user (also its password and database)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `usage: pgmfa demo [flags]

Starts a throwaway PostgreSQL (scram-sha-256), creates a user and database,
enrolls the user for TOTP in a temporary store, runs the proxy in the
foreground and prints a ready-to-paste psql line. Ctrl-C stops everything
it started and removes the temporary files. Accepts every serve flag.

flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	logger, err := newLogger(os.Stderr, f.logLevel, f.logFormat)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa:", err)
		return 2
	}
	// Piped into tee or less, Ctrl-C kills the reader too; a log line
	// written after that must not kill us (SIGPIPE) before the scratch
	// database is stopped.
	signal.Ignore(syscall.SIGPIPE)

	fmt.Fprintln(os.Stderr, "starting a scratch PostgreSQL ...")
	pg, err := pgcluster.Start(pgcluster.Options{
		Method:    pgcluster.ScramSHA256,
		Users:     []pgcluster.User{{Name: *user, Password: *user}},
		Databases: []string{*user},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa demo:", err)
		return 1
	}
	defer pg.Stop()
	if _, err := pg.Psql(fmt.Sprintf("ALTER DATABASE %s OWNER TO %s",
		pgcluster.QuoteIdent(*user), pgcluster.QuoteIdent(*user))); err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa demo:", err)
		return 1
	}

	dir, err := os.MkdirTemp("", "pgmfa-demo-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa demo:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if !flagSet(fs, "store") {
		f.store = filepath.Join(dir, "totp.json")
	}
	if !flagSet(fs, "admin") {
		f.adminAddr = filepath.Join(dir, "admin.sock")
	}
	if !flagSet(fs, "upstream") {
		f.upstream = pg.Addr()
	}
	if !flagSet(fs, "listen") && !portFree(f.listen) {
		port, _ := pgcluster.FreePort()
		f.listen = "127.0.0.1:" + strconv.Itoa(port)
	}
	if !flagSet(fs, "mfa-remember") {
		f.remember = 0
	}
	if code := runEnroll([]string{"--store", f.store, "--issuer", "pgmfa-demo", *user}); code != 0 {
		return code
	}

	p, err := f.build(logger)
	if err != nil {
		logger.Error("cannot start", "err", err)
		return 1
	}
	host, port, _ := net.SplitHostPort(splitList(f.listen)[0])
	self, _ := os.Executable()
	fmt.Printf(`
pgmfa is listening on %s, in front of PostgreSQL at %s.
Scan the QR code above with an authenticator app, or let pgmfa compute the code:

  PGPASSWORD=%s PGOPTIONS="-c pgmfa.code=$(%s code --store %s %s)" \
    psql "host=%s port=%s user=%s dbname=%s sslmode=disable"

Without a code the login waits; release it from another terminal with
  %s approve --admin %s %s CODE

Ctrl-C stops the proxy and the scratch database.
`, f.listen, pg.Addr(), *user, self, f.store, *user, host, port, *user, *user, self, f.adminAddr, *user)
	return p.runUntilSignal()
}

func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			set = true
		}
	})
	return set
}

func portFree(addr string) bool {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	return true
}
