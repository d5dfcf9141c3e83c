// Command bench is pgmfa's benchmark suite: it measures a direct
// PostgreSQL connection, pgmfa in each relay mode and pgbouncer in the same
// run, round by round, and reports each path relative to direct.
//
//	go run ./bench -help
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// The bare-sockmap path runs this binary as its splicing process.
	if len(os.Args) == 4 && os.Args[1] == bareServeArg {
		if err := serveBare(os.Args[2], os.Args[3]); err != nil {
			fmt.Fprintln(os.Stderr, "bare sockmap:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
