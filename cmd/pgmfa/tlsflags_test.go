package main

import (
	"flag"
	"net"
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
	up := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5432}
	unix := &net.UnixAddr{Name: "/tmp/.s.PGSQL.5432", Net: "unix"}
	f, _ := parse(t)
	c, m, u, err := f.build(up)
	if err != nil || c != nil || m != session.TLSOff || u.NeedsDriver() {
		t.Fatal("defaults", err, m, u)
	}
	for _, tc := range []struct {
		args []string
		addr net.Addr
		want string
	}{
		{[]string{"--tls", "require"}, up, "needs --tls-cert"},
		{[]string{"--tls", "bogus"}, up, "must be disable"},
		{[]string{"--tls-cert", "x"}, up, "go together"},
		{[]string{"--tls-cert", "/nonexistent", "--tls-key", "/nonexistent"}, up, "no such file"},
		{[]string{"--upstream-sslmode", "require"}, unix, "unix"},
		{[]string{"--upstream-sslmode", "verify-full"}, up, "needs --upstream-sslrootcert"},
		{[]string{"--upstream-sslmode", "prefer", "--upstream-sslnegotiation", "direct"}, up, "needs --upstream-sslmode require"},
		{[]string{"--upstream-sslnegotiation", "direct"}, up, "needs --upstream-sslmode require"},
		{[]string{"--upstream-sslmode", "require", "--upstream-sslnegotiation", "bogus"}, up, "postgres or direct"},
	} {
		f, _ := parse(t, tc.args...)
		_, _, _, err := f.build(tc.addr)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: want %q, got %v", tc.args, tc.want, err)
		}
	}
	f, _ = parse(t, "--upstream-sslmode", "require")
	if _, _, u, err := f.build(up); err != nil || !u.NeedsDriver() {
		t.Fatal(err)
	}
}
