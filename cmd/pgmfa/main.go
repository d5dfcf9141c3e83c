// Command pgmfa is a PostgreSQL proxy that adds TOTP multi-factor
// authentication to every login and then splices the session in the kernel.
//
// Subcommands live in their own files; main only dispatches.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
)

// subcommand runs with the arguments after its name and returns an exit code.
type subcommand struct {
	run     func(args []string) int
	summary string
}

// subcommands is the one table of subcommands: each file registers its own
// in init, and both dispatch and the help text read only this table.
var subcommands = map[string]subcommand{}

func register(name, summary string, run func(args []string) int) {
	if _, dup := subcommands[name]; dup {
		panic("pgmfa: subcommand " + name + " registered twice")
	}
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
	if name == "help" {
		usage(os.Stdout)
		return 0
	}
	sc, ok := subcommands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "pgmfa: unknown subcommand %q\n\n", name)
		usage(os.Stderr)
		return 2
	}
	return sc.run(args)
}

// usage lists every registered subcommand, in name order.
func usage(w io.Writer) {
	fmt.Fprintf(w, "usage: pgmfa [subcommand] [flags]\n\nsubcommands:\n")
	for _, n := range slices.Sorted(maps.Keys(subcommands)) {
		fmt.Fprintf(w, "  %-8s %s\n", n, subcommands[n].summary)
	}
	fmt.Fprintf(w, "\nWith no subcommand pgmfa runs serve. `pgmfa SUBCOMMAND --help` lists its flags.\n")
}

// flagExit is the exit code for a flag-parsing error: 0 after --help (the
// flag package printed the usage), 2 otherwise (it printed the problem).
func flagExit(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return 2
}
