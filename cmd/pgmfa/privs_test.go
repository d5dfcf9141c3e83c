package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/loop/sysmon"
)

// The least-privilege tests start the real binary as another user with
// chosen capabilities (setpriv, util-linux) in front of a real PostgreSQL,
// log in with MFA through pgx, and read the running proxy's credentials
// from /proc.

const (
	privUser = "postgres" // exists wherever PostgreSQL is installed
	// What kernel splicing needs to load (privs.go).
	spliceSet = capSet(1<<capBPF | 1<<capNetAdmin | 1<<capPerfmon)
)

var privLogins = []string{"alice", "bob", "carol"}

type privEnv struct {
	t         *testing.T
	dir       string // owned by privUser, world-readable
	bin       string
	store     string
	db        *pgcluster.Cluster
	uid       int
	setprivAt string
}

func newPrivEnv(t *testing.T) *privEnv {
	t.Helper()
	if testing.Short() {
		t.Skip("starts PostgreSQL and the binary as another user")
	}
	if os.Geteuid() != 0 {
		pgtest.SkipOrFail(t, "needs root to start pgmfa as %s with chosen capabilities", privUser)
	}
	if err := bpf.Probe(); err != nil {
		pgtest.SkipOrFail(t, "kernel splicing unavailable: %v", err)
	}
	e := &privEnv{t: t}
	var err error
	if e.setprivAt, err = exec.LookPath("setpriv"); err != nil {
		t.Fatalf("setpriv (util-linux) is needed: %v", err)
	}
	u, err := user.Lookup(privUser)
	if err != nil {
		pgtest.SkipOrFail(t, "no user %s: %v", privUser, err)
	}
	e.uid, _ = strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	// t.TempDir is 0700 root's; the proxy's user needs to reach the
	// binary, the store and its admin socket directory.
	if e.dir, err = os.MkdirTemp("", "pgmfa-privs-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(e.dir) })
	e.bin = filepath.Join(e.dir, "pgmfa")
	// Without cgo, as the Makefile builds it: dropping capabilities on
	// every thread needs it (privs.go).
	build := exec.Command("go", "build", "-o", e.bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	e.store = filepath.Join(e.dir, "totp.json")
	// One user per login: a code works once, and the subtests log in
	// within one TOTP step.
	var users []pgcluster.User
	for _, u := range privLogins {
		if out, err := exec.Command(e.bin, "enroll", "--store", e.store, "--qr=false", u).CombinedOutput(); err != nil {
			t.Fatalf("enroll: %v\n%s", err, out)
		}
		users = append(users, pgcluster.User{Name: u, Password: "pw"})
	}
	for _, p := range []string{e.dir, e.store, e.bin} {
		if err := os.Chown(p, e.uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(e.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.db = pgtest.Start(t, pgcluster.Options{Users: users, Databases: []string{"app"}})
	return e
}

// privProc is one running `pgmfa serve`.
type privProc struct {
	cmd   *exec.Cmd
	port  int
	done  chan struct{}
	ready chan string // what it sent to NOTIFY_SOCKET
	mu    sync.Mutex
	logs  strings.Builder
}

func (p *privProc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// logLines returns the JSON log lines whose msg is msg.
func (p *privProc) logLines(msg string) []map[string]any {
	var out []map[string]any
	for _, l := range strings.Split(p.log(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// start runs the binary with launcher (setpriv and its options, or
// nothing) and serve's flags plus extra, with a NOTIFY_SOCKET the test
// listens on.
func (e *privEnv) start(launcher []string, extra ...string) *privProc {
	t := e.t
	port, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	p := &privProc{port: port, done: make(chan struct{}), ready: make(chan string, 4)}
	sockDir, err := os.MkdirTemp(e.dir, "run-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(sockDir, 0o777)
	notify := filepath.Join(sockDir, "notify.sock")
	nc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	os.Chmod(notify, 0o777) // as systemd's is: the service's user writes to it
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := nc.ReadFromUnix(buf)
			if err != nil {
				return
			}
			p.ready <- string(buf[:n])
		}
	}()
	args := append(append([]string{}, launcher...), e.bin, "serve", "--listen", "127.0.0.1:"+strconv.Itoa(port),
		"--upstream", e.db.Addr(), "--store", e.store, "--admin", filepath.Join(sockDir, "admin.sock"),
		"--loops", "1", "--log-format", "json")
	p.cmd = exec.Command(args[0], append(args[1:], extra...)...)
	p.cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify, "PGMFA_STORE_KEY=", "PGMFA_STORE_KEY_FILE=")
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logsDone := make(chan struct{})
	go func() {
		defer close(logsDone)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.mu.Lock()
			p.logs.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
		}
	}()
	go func() { <-logsDone; _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("pgmfa serve log:\n%s", p.log())
		}
	})
	return p
}

// waitReady waits for READY=1 on the notify socket, which pgmfa sends once
// it serves with its privileges dropped.
func (p *privProc) waitReady(t *testing.T) {
	t.Helper()
	select {
	case msg := <-p.ready:
		if msg != "READY=1" {
			t.Fatalf("NOTIFY_SOCKET got %q, want READY=1", msg)
		}
	case <-p.done:
		t.Fatalf("pgmfa serve exited before it was ready:\n%s", p.log())
	case <-time.After(60 * time.Second):
		t.Fatalf("pgmfa serve did not report ready:\n%s", p.log())
	}
}

// setpriv returns a launcher that runs the command as privUser with
// exactly caps (as systemd's User= and AmbientCapabilities= do).
func (e *privEnv) setpriv(caps capSet) []string {
	list := "-all"
	for n := 0; n < len(capNames); n++ {
		if caps.has(n) {
			list += ",+" + strings.TrimPrefix(capNames[n], "cap_")
		}
	}
	return []string{e.setprivAt, "--reuid=" + privUser, "--regid=" + privUser, "--clear-groups",
		"--inh-caps=" + list, "--ambient-caps=" + list, "--bounding-set=" + list}
}

// checkCreds asserts the running proxy's uid and capability sets, on the
// process and on every thread.
func (e *privEnv) checkCreds(t *testing.T, p *privProc, bounding capSet) {
	t.Helper()
	pid := p.cmd.Process.Pid
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), fmt.Sprintf("\nUid:\t%d\t%d\t%d\t%d\n", e.uid, e.uid, e.uid, e.uid)) {
		t.Errorf("not running as %s (uid %d):\n%s", privUser, e.uid, b)
	}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if len(tasks) < 2 {
		t.Fatalf("threads of %d: %v", pid, tasks)
	}
	for _, path := range append([]string{fmt.Sprintf("/proc/%d/status", pid)}, tasks...) {
		c, err := readProcCaps(path)
		if err != nil {
			t.Fatal(err)
		}
		if c.eff != 0 || c.prm != 0 || c.inh != 0 || c.amb != 0 || c.bnd != bounding || !c.noNewPrivs {
			t.Errorf("%s: effective %s, permitted %s, inheritable %s, ambient %s, bounding %s, no_new_privs %v; want none but bounding %s and no_new_privs",
				path, c.eff, c.prm, c.inh, c.amb, c.bnd, c.noNewPrivs, bounding)
		}
	}
	// READY=1 comes over the notify socket after "pgmfa listening" is
	// written; the log lines may still be on their way through the stderr
	// pipe (a CI run at load read READY before either line).
	if !eventually(10*time.Second, func() bool { return strings.Contains(p.log(), `"pgmfa listening"`) }) {
		t.Fatalf("READY=1 came, and no \"pgmfa listening\" line within 10s:\n%s", p.log())
	}
	drop := p.logLines("privileges dropped")
	if len(drop) != 1 || drop[0]["kept"] != "none" || drop[0]["bounding_set"] != bounding.String() {
		t.Errorf("privileges dropped lines: %v", drop)
	}
	// Dropped before the first client could be accepted: the accept
	// loops start (and say "pgmfa listening") only after the drop.
	log := p.log()
	if d, l := strings.Index(log, `"privileges dropped"`), strings.Index(log, `"pgmfa listening"`); d < 0 || l < 0 || d > l {
		t.Errorf("privileges dropped (at %d) after the proxy started accepting (at %d):\n%s", d, l, log)
	}
}

// login logs user in with a code and runs a query; it returns the mode of
// the session-end line the proxy writes after the client disconnects.
func (e *privEnv) login(t *testing.T, p *privProc, user string) string {
	t.Helper()
	out, err := exec.Command(e.bin, "code", "--store", e.store, user).Output()
	if err != nil {
		t.Fatal(err)
	}
	dsn := pgcluster.DSN("127.0.0.1", p.port, user, "pw", "app") + "&options=" +
		strings.ReplaceAll(url.QueryEscape("-c pgmfa.code="+strings.TrimSpace(string(out))), "+", "%20")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("login through the proxy: %v\n%s", err, p.log())
	}
	var got string
	if err := c.QueryRow(ctx, "SELECT current_user").Scan(&got); err != nil || got != user {
		t.Fatalf("query: %q %v", got, err)
	}
	c.Close(ctx)
	var mode string
	if !eventually(30*time.Second, func() bool {
		ends := p.logLines("session end")
		if len(ends) > 0 {
			mode, _ = ends[len(ends)-1]["mode"].(string)
		}
		return len(ends) > 0
	}) {
		t.Fatalf("no session end line:\n%s", p.log())
	}
	return mode
}

// TestLeastPrivilege: pgmfa started as an ordinary user with only CAP_BPF,
// CAP_NET_ADMIN and CAP_PERFMON loads the program, then keeps none of them
// on any thread, and still splices; started as root with --user it ends as
// that user with an empty bounding set; and a missing capability is named.
func TestLeastPrivilege(t *testing.T) {
	e := newPrivEnv(t)

	t.Run("as an ordinary user with just the splice capabilities", func(t *testing.T) {
		p := e.start(e.setpriv(spliceSet), "--splice", "sockmap")
		p.waitReady(t)
		// Without CAP_SETPCAP the bounding set stays what setpriv (or
		// systemd's CapabilityBoundingSet=) gave; permitted is empty.
		e.checkCreds(t, p, spliceSet)
		if mode := e.login(t, p, "alice"); mode != "sockmap" {
			t.Fatalf("session mode %q, want sockmap:\n%s", mode, p.log())
		}
		e.checkCreds(t, p, spliceSet) // threads started since
		// No CAP_SYS_NICE: SCHED_BATCH only, the timer slack as it was.
		checkSysmon(t, p, "50000")
	})

	t.Run("as root with --user", func(t *testing.T) {
		p := e.start(nil, "--splice", "sockmap", "--user", privUser)
		p.waitReady(t)
		e.checkCreds(t, p, 0)
		if mode := e.login(t, p, "bob"); mode != "sockmap" {
			t.Fatalf("session mode %q, want sockmap:\n%s", mode, p.log())
		}
		// Set while still root: SCHED_BATCH and a 10 ms slack.
		checkSysmon(t, p, strconv.FormatInt(sysmonSlack.Nanoseconds(), 10))
	})

	t.Run("--quiet-sysmon=false leaves every thread under SCHED_OTHER", func(t *testing.T) {
		p := e.start(nil, "--splice", "sockmap", "--user", privUser, "--quiet-sysmon=false")
		p.waitReady(t)
		for _, tid := range threadsOf(t, p.cmd.Process.Pid) {
			if a, err := unix.SchedGetAttr(tid, 0); err == nil && a.Policy != unix.SCHED_NORMAL {
				t.Errorf("thread %d has policy %d", tid, a.Policy)
			}
		}
	})

	t.Run("without CAP_PERFMON, --splice sockmap refuses to start", func(t *testing.T) {
		p := e.start(e.setpriv(spliceSet&^(1<<capPerfmon)), "--splice", "sockmap")
		select {
		case <-p.done:
		case <-time.After(60 * time.Second):
			t.Fatal("pgmfa serve kept running")
		}
		if p.cmd.ProcessState.ExitCode() != 1 || !strings.Contains(p.log(), "lacks CAP_PERFMON") {
			t.Fatalf("exit %d, log:\n%s", p.cmd.ProcessState.ExitCode(), p.log())
		}
	})

	t.Run("without CAP_PERFMON, --splice auto relays", func(t *testing.T) {
		p := e.start(e.setpriv(spliceSet&^(1<<capPerfmon)), "--splice", "auto")
		p.waitReady(t)
		warn := p.logLines("kernel splicing unavailable; sessions use the user-space relay")
		if len(warn) != 1 || warn[0]["missing"] != "CAP_PERFMON" {
			t.Fatalf("fallback warning: %v\n%s", warn, p.log())
		}
		if mode := e.login(t, p, "carol"); mode != "relay" {
			t.Fatalf("session mode %q, want relay", mode)
		}
	})

	t.Run("a port below 1024 without CAP_NET_BIND_SERVICE", func(t *testing.T) {
		p := e.start(e.setpriv(spliceSet), "--splice", "sockmap", "--admin", "127.0.0.1:1")
		<-p.done
		if p.cmd.ProcessState.ExitCode() != 1 || !strings.Contains(p.log(), "needs CAP_NET_BIND_SERVICE") {
			t.Fatalf("exit %d, log:\n%s", p.cmd.ProcessState.ExitCode(), p.log())
		}
	})
}

// threadsOf lists a process's threads in the order they started.
func threadsOf(t *testing.T, pid int) []int {
	t.Helper()
	ts, err := sysmon.ThreadsByStart(pid)
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

// checkSysmon: the serving process's sysmon thread (its second) is under
// SCHED_BATCH with the timer slack wantSlack (ns), and every other thread
// under SCHED_OTHER (--quiet-sysmon, loop/sysmon).
//
// Threads sysmon starts inherit SCHED_BATCH until the guard's next check
// (one at readiness, then every second), so the other threads get up to
// three seconds to be set back.
func checkSysmon(t *testing.T, p *privProc, wantSlack string) {
	t.Helper()
	var ts []int
	var wrong []string
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		ts, wrong = threadsOf(t, p.cmd.Process.Pid), nil
		if len(ts) < 2 {
			t.Fatalf("%d threads", len(ts))
		}
		for i, tid := range ts {
			a, err := unix.SchedGetAttr(tid, 0)
			if err != nil {
				continue // exited
			}
			want := uint32(unix.SCHED_NORMAL)
			if i == 1 {
				want = unix.SCHED_BATCH
			}
			if a.Policy != want {
				wrong = append(wrong, fmt.Sprintf("thread %d (#%d) has policy %d, want %d", tid, i, a.Policy, want))
			}
		}
		if len(wrong) == 0 || time.Now().After(deadline) {
			break
		}
	}
	for _, w := range wrong {
		t.Error(w)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(ts[1]) + "/timerslack_ns")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(b)); got != wantSlack {
		t.Errorf("sysmon thread %d has timer slack %s ns, want %s", ts[1], got, wantSlack)
	}
}

// TestSdNotify sends to a real unixgram socket, by path and by abstract
// name, and does nothing without NOTIFY_SOCKET.
func TestSdNotify(t *testing.T) {
	for _, name := range []string{filepath.Join(t.TempDir(), "notify.sock"), "@pgmfa-test-" + strconv.Itoa(os.Getpid())} {
		c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		t.Setenv("NOTIFY_SOCKET", name)
		if err := sdNotify("READY=1"); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, _, err := c.ReadFromUnix(buf)
		if err != nil || string(buf[:n]) != "READY=1" {
			t.Fatalf("%s: got %q %v", name, buf[:n], err)
		}
		c.Close()
	}
	t.Setenv("NOTIFY_SOCKET", "")
	if err := sdNotify("READY=1"); err != nil {
		t.Fatalf("without NOTIFY_SOCKET: %v", err)
	}
	t.Setenv("NOTIFY_SOCKET", "relative.sock")
	if err := sdNotify("READY=1"); err == nil {
		t.Fatal("a relative NOTIFY_SOCKET was accepted")
	}
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "missing.sock"))
	if err := sdNotify("READY=1"); err == nil {
		t.Fatal("a missing NOTIFY_SOCKET was accepted")
	}
}

// TestCapSet: names and the /proc parser against this process.
func TestCapSet(t *testing.T) {
	if s := spliceSet.String(); s != "cap_net_admin,cap_perfmon,cap_bpf" {
		t.Errorf("String() = %q", s)
	}
	if s := capSet(0).String(); s != "none" {
		t.Errorf("empty set: %q", s)
	}
	if m := missingSpliceCaps(1 << capBPF); m != 1<<capNetAdmin|1<<capPerfmon {
		t.Errorf("missing with CAP_BPF alone: %s", m)
	}
	if m := missingSpliceCaps(1 << capSysAdmin); m != 0 {
		t.Errorf("missing with CAP_SYS_ADMIN: %s", m)
	}
	c, err := readProcCaps("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	if c.bnd == 0 || c.eff&^c.prm != 0 {
		t.Errorf("this process: %+v", c)
	}
}

// TestServiceUnit checks the shipped systemd unit: its ExecStart parses as
// serve's flags, it grants exactly the capabilities start-up needs, and
// systemd-analyze (when installed) finds nothing to complain about.
func TestServiceUnit(t *testing.T) {
	b, err := os.ReadFile("pgmfa.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			unit[k] = v
		}
	}
	var names []string
	for _, c := range spliceCaps {
		names = append(names, strings.ToUpper(capNames[c]))
	}
	want := strings.Join(names, " ")
	for _, k := range []string{"AmbientCapabilities", "CapabilityBoundingSet"} {
		if unit[k] != want {
			t.Errorf("%s=%s, want %s", k, unit[k], want)
		}
	}
	for k, v := range map[string]string{"User": "pgmfa", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "Type": "notify"} {
		if unit[k] != v {
			t.Errorf("%s=%s, want %s", k, unit[k], v)
		}
	}
	args := strings.Fields(unit["ExecStart"])
	if len(args) < 2 || args[1] != "serve" {
		t.Fatalf("ExecStart=%s", unit["ExecStart"])
	}
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var f serveFlags
	f.register(fs)
	if err := fs.Parse(args[2:]); err != nil || fs.NArg() != 0 {
		t.Errorf("ExecStart's flags: %v %v", err, fs.Args())
	}
	if !strings.HasPrefix(f.store, "/var/lib/pgmfa/") || unit["StateDirectory"] != "pgmfa" {
		t.Errorf("the store %s is not in StateDirectory=%s", f.store, unit["StateDirectory"])
	}
	if !strings.HasPrefix(f.adminAddr, "/run/pgmfa/") || unit["RuntimeDirectory"] != "pgmfa" {
		t.Errorf("the admin socket %s is not in RuntimeDirectory=%s", f.adminAddr, unit["RuntimeDirectory"])
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed; the unit was only parse-checked")
	}
	// verify wants ExecStart to exist; any executable stands in for it.
	dir := t.TempDir()
	path := filepath.Join(dir, "pgmfa.service")
	if err := os.WriteFile(path, []byte(strings.Replace(string(b), "ExecStart="+args[0], "ExecStart="+os.Args[0], 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	// It exits 0 on unknown keys and bad values, only saying so.
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil || len(out) != 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}
