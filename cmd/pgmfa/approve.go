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
	"unicode"

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

// defaultTokenFile is the TCP admin API's token file unless
// --admin-token-file says otherwise: $PGMFA_ADMIN_TOKEN_FILE, else
// /run/pgmfa/admin.token.
func defaultTokenFile() string {
	if p := os.Getenv("PGMFA_ADMIN_TOKEN_FILE"); p != "" {
		return p
	}
	return admin.DefaultTokenFile
}

func runApprove(args []string) int { return approve(args, os.Stdin, os.Stdout, os.Stderr) }

// approve is `pgmfa approve`, with its streams injected for tests.
func approve(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("approve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("admin", defaultAdminAddr(), "the proxy's admin API: a unix-socket path or a loopback host:port (env PGMFA_ADMIN)")
	tokenFile := fs.String("admin-token-file", defaultTokenFile(), "with a TCP --admin: the token file pgmfa serve wrote (env PGMFA_ADMIN_TOKEN_FILE)")
	conn := fs.Uint64("conn", 0, "release only this waiting login (its CONN from --list, the conn= of the proxy's log)")
	all := fs.Bool("all", false, "release every waiting login of USER. RISK: one you did not start — someone else who has USER's password, logging in at the same time — gets in on this code too; check --list first. Opens no --mfa-remember window")
	list := fs.Bool("list", false, "list the logins waiting for approval instead of approving")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for the proxy to answer")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `usage: pgmfa approve [--admin ADDR] [--conn ID | --all] USER [CODE]
       pgmfa approve --list [--admin ADDR]

A login that arrives without a TOTP code waits (up to the proxy's
--mfa-timeout). This releases it: CODE is USER's current code, checked once.
When exactly one login of USER waits, it is released. When several wait,
none is: they are listed, and you choose yours with --conn ID (or all of
them with --all). Without CODE on the command line it is read from
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
	if *conn != 0 && *all {
		fmt.Fprintln(stderr, "pgmfa approve: --conn and --all exclude each other")
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	client := admin.Client{Addr: *addr}
	if !admin.IsUnix(*addr) {
		if client.Token, err = admin.ReadToken(*tokenFile); err != nil {
			fmt.Fprintln(stderr, "pgmfa approve:", err)
			return 1
		}
	}

	if *list {
		if len(pos) != 0 {
			fs.Usage()
			return 2
		}
		pending, err := client.List(ctx)
		if err != nil {
			return adminFailed(stderr, "approve", err)
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
	released, err := client.Approve(ctx, user, code, admin.ApproveOptions{ConnID: *conn, All: *all})
	var e *admin.Error
	if errors.As(err, &e) && e.Reason == mfa.ReasonSeveral {
		fmt.Fprintf(stderr, "pgmfa approve: %d logins of %s are waiting; none was released (the code was not used).\n", len(e.Waiting), user)
		fmt.Fprintln(stderr, "Release the one you started with --conn ID; a login you do not recognise may be someone else who has the password:")
		printPending(stderr, e.Waiting, "")
		if len(e.Waiting) > 0 {
			fmt.Fprintf(stderr, "e.g.: pgmfa approve --conn %d %s CODE\n", e.Waiting[0].ID, user)
		}
		return 1
	}
	if err != nil {
		return adminFailed(stderr, "approve", err)
	}
	if len(released) == 0 {
		// The logins went away (timed out, client gave up) between the
		// check and the release.
		fmt.Fprintf(stderr, "pgmfa approve: the code was accepted, but the waiting login of %s had already ended\n", user)
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
	fmt.Fprintln(tw, "CONN\tUSER\tCLIENT\tDATABASE\tAPPLICATION\tWAITING SINCE")
	now := time.Now()
	for _, p := range ps {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s (%v)\n", p.ID, printable(p.User), p.Addr, orDash(printable(p.Database)), orDash(printable(p.AppName)),
			p.Since.Local().Format("15:04:05"), now.Sub(p.Since).Round(time.Second))
	}
	tw.Flush()
}

// printable keeps a client-chosen string (application_name) from writing
// control sequences to the operator's terminal.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return '?'
		}
		return r
	}, s)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// adminFailed prints an admin API call's failure (the proxy's refusal
// with its hint, or why the call failed) as subcommand cmd and returns 1.
func adminFailed(stderr io.Writer, cmd string, err error) int {
	var e *admin.Error
	if errors.As(err, &e) {
		fmt.Fprintf(stderr, "pgmfa %s: %s\n", cmd, e.Message)
		if e.Hint != "" {
			fmt.Fprintln(stderr, "HINT:", e.Hint)
		}
		return 1
	}
	fmt.Fprintf(stderr, "pgmfa %s: %v\n", cmd, err)
	return 1
}
