package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pgmfa/pgmfa/loop/admin"
	"github.com/pgmfa/pgmfa/mfa"
)

func init() {
	register("approve", "release logins waiting for MFA with a user's code (or --list them)", runApprove)
}

// defaultAdminAddr is the admin API unless --admin says otherwise:
// $PGMFA_ADMIN, else /run/pgmfa/admin.sock.
func defaultAdminAddr() string {
	if a := os.Getenv("PGMFA_ADMIN"); a != "" {
		return a
	}
	return admin.DefaultSocket
}

func runApprove(args []string) int { return approve(args, os.Stdin, os.Stdout, os.Stderr) }

// approve is `pgmfa approve`, with its streams injected for tests.
func approve(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("approve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("admin", defaultAdminAddr(), "the proxy's admin API: a unix-socket path or a loopback host:port (env PGMFA_ADMIN)")
	conn := fs.Uint64("conn", 0, "release only this waiting login (its id from --list); 0 releases every login of USER")
	list := fs.Bool("list", false, "list the logins waiting for approval instead of approving")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for the proxy to answer")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `usage: pgmfa approve [--admin ADDR] [--conn ID] USER [CODE]
       pgmfa approve --list [--admin ADDR]

A login that arrives without a TOTP code waits (up to the proxy's
--mfa-timeout). This releases the waiting logins of USER: CODE is USER's
current code, checked once. Without CODE on the command line it is read from
standard input, which keeps it out of shell history. Exit status 1 when
nothing was released.

flags:
`)
		fs.PrintDefaults()
	}
	pos, err := parseMixed(fs, args)
	if err != nil {
		return flagExit(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	if *list {
		if len(pos) != 0 {
			fs.Usage()
			return 2
		}
		pending, err := admin.List(ctx, *addr)
		if err != nil {
			return approveFailed(stderr, err)
		}
		printPending(stdout, pending, "no logins are waiting for approval\n")
		return 0
	}

	if len(pos) < 1 || len(pos) > 2 {
		fs.Usage()
		return 2
	}
	user := pos[0]
	var code string
	if len(pos) == 2 {
		code = pos[1]
	} else {
		fmt.Fprintf(stderr, "code for %s: ", user)
		line, err := bufio.NewReader(stdin).ReadString('\n')
		if err != nil && line == "" {
			fmt.Fprintln(stderr, "\npgmfa approve: no code given")
			return 2
		}
		code = strings.TrimSpace(line)
	}
	released, err := admin.Approve(ctx, *addr, user, code, *conn)
	if err != nil {
		return approveFailed(stderr, err)
	}
	if len(released) == 0 {
		// The logins went away (timed out, client gave up) between the
		// check and the release.
		fmt.Fprintf(stderr, "pgmfa approve: the code was accepted, but the waiting logins of %s had already ended\n", user)
		return 1
	}
	fmt.Fprintf(stdout, "released %d login(s) of %s:\n", len(released), user)
	printPending(stdout, released, "")
	return 0
}

// printPending prints logins as a table.
func printPending(w io.Writer, ps []mfa.Pending, empty string) {
	if len(ps) == 0 {
		fmt.Fprint(w, empty)
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CONN\tUSER\tCLIENT\tWAITING SINCE")
	now := time.Now()
	for _, p := range ps {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s (%v)\n", p.ID, p.User, p.Addr,
			p.Since.Local().Format("15:04:05"), now.Sub(p.Since).Round(time.Second))
	}
	tw.Flush()
}

// approveFailed prints the proxy's refusal with its hint and returns 1.
func approveFailed(stderr io.Writer, err error) int {
	var e *admin.Error
	if errors.As(err, &e) {
		fmt.Fprintln(stderr, "pgmfa approve:", e.Message)
		if e.Hint != "" {
			fmt.Fprintln(stderr, "HINT:", e.Hint)
		}
		return 1
	}
	fmt.Fprintln(stderr, "pgmfa approve:", err)
	return 1
}
