package main

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
)

func TestParseArgs(t *testing.T) {
	pgmfa, user, rest, err := parseArgs([]string{"--pgmfa=/x/pgmfa", "-user", "u1", "--listen", "127.0.0.1:1", "--splice=off"})
	if err != nil || pgmfa != "/x/pgmfa" || user != "u1" || strings.Join(rest, " ") != "--listen 127.0.0.1:1 --splice=off" {
		t.Fatalf("got %q %q %q %v", pgmfa, user, rest, err)
	}
	if _, _, _, err := parseArgs([]string{"--user"}); err == nil {
		t.Fatal("--user without a value was accepted")
	}
	if _, _, _, err := parseArgs([]string{"--help"}); err != errHelp {
		t.Fatalf("--help: %v", err)
	}
	for _, tc := range []struct {
		args []string
		want string
		ok   bool
	}{
		{[]string{"--store", "/s"}, "/s", true},
		{[]string{"-store=/s"}, "/s", true},
		{[]string{"--store-x", "/s"}, "", false},
		{[]string{"store"}, "", false},
	} {
		if v, ok := flagValue(tc.args, "store"); v != tc.want || ok != tc.ok {
			t.Errorf("flagValue(%q) = %q, %v", tc.args, v, ok)
		}
	}
}

// TestDemo is `make run` end to end: the demo starts PostgreSQL and pgmfa,
// the printed line logs in with the computed code, Ctrl-C (SIGINT to the
// process group, as a terminal sends it) stops everything and leaves no
// temporary files.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL; skipped with -short")
	}
	if _, err := pgcluster.BinDir(); err != nil {
		pgtest.SkipOrFail(t, "%v", err)
	}
	if os.Geteuid() != 0 {
		pgtest.SkipOrFail(t, "the demo's cluster needs root")
	}
	dir := t.TempDir()
	for _, b := range []struct{ out, pkg string }{{"pgmfa", "../pgmfa"}, {"pgmfa-demo", "."}} {
		if out, err := exec.Command("go", "build", "-o", filepath.Join(dir, b.out), b.pkg).CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", b.pkg, err, out)
		}
	}
	port, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	listen := "127.0.0.1:" + itoa(port)
	cmd := exec.Command(filepath.Join(dir, "pgmfa-demo"), "--listen", listen, "--splice", "off")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := false
	t.Cleanup(func() {
		if !exited {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			cmd.Wait()
		}
	})
	// The ready line names the store; everything else is read on.
	storeRE := regexp.MustCompile(`code --store (\S+) demo\)`)
	var store string
	var out strings.Builder
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		if m := storeRE.FindStringSubmatch(sc.Text()); m != nil {
			store = m[1]
			break
		}
	}
	if store == "" {
		t.Fatalf("the demo exited without printing the psql line:\n%s", out.String())
	}
	go func() {
		for sc.Scan() {
		}
	}()
	code, err := exec.Command(filepath.Join(dir, "pgmfa"), "code", "--store", store, "demo").Output()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg, err := pgx.ParseConfig(pgcluster.DSN("127.0.0.1", port, "demo", "demo", "demo"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["pgmfa.code"] = strings.TrimSpace(string(code))
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("login through the demo: %v", err)
	}
	var who string
	if err := conn.QueryRow(ctx, "select current_user").Scan(&who); err != nil || who != "demo" {
		t.Fatalf("current_user = %q, %v", who, err)
	}
	conn.Close(ctx)

	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	exited = true
	if err != nil {
		t.Fatalf("the demo did not exit cleanly on Ctrl-C: %v", err)
	}
	if _, err := os.Stat(filepath.Dir(store)); !os.IsNotExist(err) {
		t.Fatalf("the demo left its temporary directory %s: %v", filepath.Dir(store), err)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
