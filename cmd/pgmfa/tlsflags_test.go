package main

import (
	"flag"
	"strings"
	"testing"

	"github.com/pgmfa/pgmfa/proto/session"
)

func parse(t *testing.T, args ...string) (*tlsFlags, error) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	var f tlsFlags
	f.register(fs)
	return &f, fs.Parse(args)
}

func TestBuild(t *testing.T) {
	f, _ := parse(t)
	c, m, u, err := f.build()
	if err != nil || c != nil || m != session.TLSOff || u.NeedsDriver() {
		t.Fatal("defaults", err, m, u)
	}
	// The upstream settings are checked against the address by
	// tlsproxy.Dialer when the server starts (loop/tlsproxy/upstream_test.go).
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--tls", "require"}, "needs --tls-cert"},
		{[]string{"--tls", "bogus"}, "must be disable"},
		{[]string{"--tls-cert", "x"}, "go together"},
		{[]string{"--tls-cert", "/nonexistent", "--tls-key", "/nonexistent"}, "no such file"},
	} {
		f, _ := parse(t, tc.args...)
		_, _, _, err := f.build()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: want %q, got %v", tc.args, tc.want, err)
		}
	}
	f, _ = parse(t, "--upstream-sslmode", "require")
	if _, _, u, err := f.build(); err != nil || !u.NeedsDriver() {
		t.Fatal(err)
	}
}
