package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/loop/admin"
)

func init() {
	register("sessions", "list the proxy's open sessions, or end one with --kill ID", runSessions)
}

func runSessions(args []string) int { return sessions(args, os.Stdout, os.Stderr) }

// sessions is `pgmfa sessions`, with its streams injected for tests.
func sessions(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("sessions", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("admin", defaultAdminAddr(), "the proxy's admin API: a unix-socket path or a loopback host:port (env PGMFA_ADMIN)")
	tokenFile := fs.String("admin-token-file", defaultTokenFile(), "with a TCP --admin: the token file pgmfa serve wrote (env PGMFA_ADMIN_TOKEN_FILE)")
	kill := fs.Uint64("kill", 0, "end the session with this ID (the CONN column; conn= in the proxy's log): both of its sockets are closed and its database backend is terminated")
	asJSON := fs.Bool("json", false, "print JSON (for scripts) instead of a table")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for the proxy to answer")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `usage: pgmfa sessions [--admin ADDR] [--json]
       pgmfa sessions --kill ID [--admin ADDR] [--json]

Lists the sessions the proxy carries after their login: connection id,
user, database, client address, how they are carried (sockmap: spliced in
the kernel, whose own counters give the bytes; relay: the user-space relay;
tls-relay: a TLS session), bytes each way so far and age. --kill ID ends one
session and its database backend. Exit status 1 when the proxy cannot be
reached or ID names no open session.

flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return 2
	}
	client := admin.Client{Addr: *addr}
	if !admin.IsUnix(*addr) {
		var err error
		if client.Token, err = admin.ReadToken(*tokenFile); err != nil {
			fmt.Fprintln(stderr, "pgmfa sessions:", err)
			return 1
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if *kill != 0 {
		ended, err := client.KillSession(ctx, *kill)
		if err != nil {
			return adminFailed(stderr, "sessions", err)
		}
		if *asJSON {
			return printJSON(stdout, stderr, map[string]admin.Session{"ended": ended})
		}
		fmt.Fprintf(stdout, "ended session %d:\n", ended.ID)
		printSessions(stdout, []admin.Session{ended})
		return 0
	}
	list, err := client.ListSessions(ctx)
	if err != nil {
		return adminFailed(stderr, "sessions", err)
	}
	if *asJSON {
		if list == nil {
			list = []admin.Session{}
		}
		return printJSON(stdout, stderr, map[string][]admin.Session{"sessions": list})
	}
	if len(list) == 0 {
		fmt.Fprintln(stdout, "no open sessions")
		return 0
	}
	printSessions(stdout, list)
	return 0
}

func printJSON(stdout, stderr io.Writer, v any) int {
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		fmt.Fprintln(stderr, "pgmfa sessions:", err)
		return 1
	}
	return 0
}

// printSessions prints sessions as a table.
func printSessions(w io.Writer, ss []admin.Session) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CONN\tUSER\tDATABASE\tCLIENT\tMODE\tCLIENT→DB\tDB→CLIENT\tAGE")
	for _, s := range ss {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, printable(s.User), orDash(printable(s.Database)), s.Client, s.Mode,
			humanBytes(s.ClientToServer), humanBytes(s.ServerToClient), time.Duration(s.AgeSeconds*float64(time.Second)).Round(time.Second))
	}
	tw.Flush()
}

// humanBytes writes a byte count in binary units, exact below 1 KiB.
func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// liveSessions serves the admin API's sessions from the proxy's registry.
type liveSessions struct{ srv *loop.Server }

func (l liveSessions) List() []admin.Session {
	infos := l.srv.Sessions()
	out := make([]admin.Session, len(infos))
	for i, in := range infos {
		out[i] = wireSession(in)
	}
	return out
}

func (l liveSessions) Kill(id uint64) (admin.Session, error) {
	in, err := l.srv.EndSession(id, 5*time.Second)
	if errors.Is(err, loop.ErrNoSession) {
		return admin.Session{}, admin.ErrNoSession
	}
	return wireSession(in), err
}

func wireSession(in loop.SessionInfo) admin.Session {
	return admin.Session{ID: in.ID, User: in.User, Database: in.Database, Client: in.Client, Mode: in.Mode,
		ClientToServer: in.ClientToServer, ServerToClient: in.ServerToClient, Since: in.Since,
		AgeSeconds: time.Since(in.Since).Seconds()}
}
