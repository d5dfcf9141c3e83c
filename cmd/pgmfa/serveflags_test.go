package main

import (
	"flag"
	"log/slog"
	"strings"
	"testing"
)

// The spare-connection flags are checked before anything starts.
func TestSpareFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--spare-conns", "-1"}, "--spare-conns must be 0 to 64"},
		{[]string{"--spare-conns", "65"}, "--spare-conns must be 0 to 64"},
		{[]string{"--spare-max-age", "0s"}, "--spare-max-age must be more than 0"},
		{[]string{"--spare-max-age", "11m"}, "at most 10m"},
	} {
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		var f serveFlags
		f.register(fs)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		if _, err := f.build(slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want an error saying %q", tc.args, err, tc.want)
		}
	}
}
