package main

import (
	"flag"
	"fmt"
	"os"
	"time"
)

func init() {
	register("code", "print a user's current TOTP code from the store (demos and tests)", runCode)
}

// runCode prints the code an authenticator app would show now. Anyone who
// can read the store can do this anyway (the store is the secret), so it
// adds no power; it exists so `make run` and scripts need no phone.
func runCode(args []string) int {
	fs := flag.NewFlagSet("code", flag.ContinueOnError)
	store := fs.String("store", defaultStorePath(), storeUsage)
	keyFile := fs.String("store-key-file", defaultKeyFile(), keyFileUsage)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: pgmfa code [--store STORE] [--store-key-file FILE] USER\n\nPrints USER's current TOTP code, computed from the store.\nMeant for demos and scripts; in production the code comes from the user's authenticator.\n\nflags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	s, err := openStore(*store, *keyFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa code:", err)
		return 1
	}
	defer s.Close()
	code, err := s.Code(fs.Arg(0), time.Now())
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgmfa code:", err)
		return 1
	}
	fmt.Println(code)
	return 0
}
