// Command pgmfa is a PostgreSQL proxy that adds TOTP multi-factor
// authentication to every login and then splices the session in the kernel.
//
// Subcommands live in their own files; main only dispatches.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
)

// subcommand runs with the arguments after its name and returns an exit code.
type subcommand struct {
	run     func(args []string) int
	summary string
}

var subcommands = map[string]subcommand{}

func register(name, summary string, run func(args []string) int) {
	subcommands[name] = subcommand{run: run, summary: summary}
}

func main() {
	os.Exit(dispatch(os.Args[1:]))
}

func dispatch(args []string) int {
	name := "serve"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		name, args = args[0], args[1:]
	}
	switch name {
	case "help":
		usage()
		return 0
	}
	sc, ok := subcommands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "pgmfa: unknown subcommand %q\n\n", name)
		usage()
		return 2
	}
	return sc.run(args)
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: pgmfa [subcommand] [flags]\n\nsubcommands:\n")
	for _, n := range []string{"serve", "enroll", "approve", "store", "demo", "version"} {
		if sc, ok := subcommands[n]; ok {
			fmt.Fprintf(os.Stderr, "  %-8s %s\n", n, sc.summary)
		}
	}
	fmt.Fprintf(os.Stderr, "\nWith no subcommand pgmfa runs serve. `pgmfa SUBCOMMAND --help` lists its flags.\n")
}

// flagExit is the exit code for a flag-parsing error: 0 after --help (the
// flag package printed the usage), 2 otherwise (it printed the problem).
func flagExit(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return 2
}
