// Command bench is pgmfa's benchmark suite: it measures a direct
// PostgreSQL connection, pgmfa in each relay mode and pgbouncer in the same
// run, round by round, and reports each path relative to direct.
//
//	go run ./bench -help
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
