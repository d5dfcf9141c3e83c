package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/loop/admin"
)

// takeoverEnv is a database with alice, bob and carol (enrolled) and svc (exempt
// from MFA), a file store, and the pgmfa binary.
type takeoverEnv struct {
	t     *testing.T
	bin   string
	db    *pgcluster.Cluster
	store string
	port  int
	tk    string // the takeover socket
}

type serveProc struct {
	name  string
	admin string
	mu    sync.Mutex
	logs  strings.Builder
	cmd   *exec.Cmd
	done  chan struct{}
	err   error
}

func (p *serveProc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

func newTakeoverEnv(t *testing.T, rows int) *takeoverEnv {
	t.Helper()
	// Built as make build builds it (CGO_ENABLED=0), so that serve drops
	// every capability before it accepts: B adopts the sessions without
	// any, as in production.
	bin := filepath.Join(t.TempDir(), "pgmfa")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	e := &takeoverEnv{t: t, bin: bin}
	e.db = pgtest.Start(t, pgcluster.Options{
		Users:     []pgcluster.User{{Name: "alice", Password: fleetPW}, {Name: "bob", Password: fleetPW}, {Name: "carol", Password: fleetPW}, {Name: "svc", Password: fleetPW}},
		Databases: []string{"app"},
	})
	dir := t.TempDir()
	e.store = filepath.Join(dir, "totp.json")
	e.tk = filepath.Join(dir, "takeover.sock")
	for _, u := range []string{"alice", "bob", "carol"} {
		if out, err := e.run("enroll", "--store", e.store, "--store-key-file", "", "--qr=false", u); err != nil {
			t.Fatalf("enroll %s: %v\n%s", u, err, out)
		}
	}
	var err error
	if e.port, err = pgcluster.FreePort(); err != nil {
		t.Fatal(err)
	}
	if rows > 0 {
		if _, err := e.db.PsqlDB("app", fmt.Sprintf(`create table big as
			select g, md5(g::text) || repeat('x', 200) as payload from generate_series(1, %d) g;
			grant select on big to public`, rows)); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

func (e *takeoverEnv) run(args ...string) (string, error) {
	cmd := exec.Command(e.bin, args...)
	cmd.Env = append(os.Environ(), "PGMFA_STORE=", "PGMFA_STORE_KEY_FILE=", "PGMFA_STORE_KEY=")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (e *takeoverEnv) code(user string) string {
	e.t.Helper()
	out, err := e.run("code", "--store", e.store, "--store-key-file", "", user)
	if err != nil {
		e.t.Fatalf("pgmfa code: %v\n%s", err, out)
	}
	return strings.TrimSpace(out)
}

// serve starts pgmfa serve (name for the log) and returns at once.
func (e *takeoverEnv) serve(name string, extra ...string) *serveProc {
	t := e.t
	p := &serveProc{name: name, admin: filepath.Join(t.TempDir(), "admin.sock"), done: make(chan struct{})}
	args := append([]string{"serve", "--listen", "127.0.0.1:" + strconv.Itoa(e.port), "--upstream", e.db.Addr(),
		"--store", e.store, "--store-key-file", "", "--admin", p.admin, "--loops", "1", "--mfa-exempt", "svc"}, extra...)
	p.cmd = exec.Command(e.bin, args...)
	p.cmd.Env = append(os.Environ(), "PGMFA_STORE_KEY=")
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	read := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.mu.Lock()
			p.logs.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
		}
		close(read)
	}()
	go func() { <-read; p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("pgmfa serve %s log:\n%s", p.name, p.log())
		}
	})
	return p
}

func (p *serveProc) waitLog(t *testing.T, d time.Duration, want string) {
	t.Helper()
	if !eventually(d, func() bool { return strings.Contains(p.log(), want) }) {
		t.Fatalf("pgmfa serve %s did not log %q:\n%s", p.name, want, p.log())
	}
}

func (p *serveProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// sessions lists the live sessions through `pgmfa sessions --json`.
func (e *takeoverEnv) sessions(p *serveProc) []admin.Session {
	e.t.Helper()
	cmd := exec.Command(e.bin, "sessions", "--admin", p.admin, "--json")
	out, err := cmd.Output()
	if err != nil {
		e.t.Fatalf("pgmfa sessions (%s): %v\n%s", p.name, err, out)
	}
	var v struct{ Sessions []admin.Session }
	if err := json.Unmarshal(out, &v); err != nil {
		e.t.Fatal(err)
	}
	return v.Sessions
}

func (e *takeoverEnv) login(ctx context.Context, user, code string) error {
	dsn := pgcluster.DSN("127.0.0.1", e.port, user, fleetPW, "app")
	if code != "" {
		dsn += "&options=-c%20pgmfa.code%3D" + code
	}
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	var one int
	return c.QueryRow(ctx, "SELECT 1").Scan(&one)
}

// copyHash runs psql \copy of big to stdout and hashes it, reading slowly
// (1 MiB per 20 ms) and stopping at 24 MiB until fast is closed, so the
// COPY is in the middle of its stream, its reader stalled, when the
// takeovers happen; read counts the bytes so far.
func copyHash(t *testing.T, host string, port int, user, code string, fast <-chan struct{}, read *atomic.Int64) (string, int64, error) {
	cmd := exec.Command("psql", "-X", "-h", host, "-p", strconv.Itoa(port), "-U", user, "-d", "app",
		"-c", `\copy (select * from big order by g) to stdout`)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+fleetPW, "PGSSLMODE=disable", "PGOPTIONS=")
	if code != "" {
		cmd.Env = append(cmd.Env, "PGOPTIONS=-c pgmfa.code="+code)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return "", 0, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return "", 0, err
	}
	h := sha256.New()
	var n int64
	buf := make([]byte, 1<<20)
	for {
		if fast != nil {
			select {
			case <-fast:
			default:
				time.Sleep(20 * time.Millisecond)
				if n >= 24<<20 {
					<-fast // stalled: psql, then the sessions' TCP windows, fill up
				}
			}
		}
		m, err := io.ReadFull(stdout, buf)
		h.Write(buf[:m])
		n += int64(m)
		if read != nil {
			read.Store(n)
		}
		if err != nil {
			break
		}
	}
	if err := cmd.Wait(); err != nil {
		return "", n, fmt.Errorf("psql \\copy: %v\n%s", err, stderr.String())
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// TestTakeover: serve B takes over from serve A (--splice sockmap), and C
// from B, while
// pgbench (16 clients) and a large COPY run through A's spliced sessions
// and new logins keep coming: A and B exit 0, B then C own every session
// (they list them; C writes their "session end" lines), pgbench has no failed
// transaction and no lost connection, the COPY is byte-identical to a
// direct one, and every login during the takeover succeeds.
func TestTakeover(t *testing.T) {
	if err := bpf.Probe(); err != nil {
		pgtest.SkipOrFail(t, "kernel splicing unavailable: %v", err)
	}
	if _, err := exec.LookPath("pgbench"); err != nil {
		pgtest.SkipOrFail(t, "pgbench not installed")
	}
	rows := 400_000 // about 100 MB of COPY
	if os.Getenv("PGMFA_SOAK") == "1" {
		rows = 2_000_000 // about 500 MB
	}
	e := newTakeoverEnv(t, rows)
	if _, err := e.db.PsqlDB("app", "grant all on schema public to alice"); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("pgbench", "-i", "-q", "-s", "1", "-h", e.db.Host, "-p", strconv.Itoa(e.db.Port), "-U", "alice", "app")
	cmd.Env = append(os.Environ(), "PGPASSWORD="+fleetPW, "PGOPTIONS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pgbench -i: %v\n%s", err, out)
	}
	want, size, err := copyHash(t, e.db.Host, e.db.Port, "svc", "", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	flags := []string{"--splice", "sockmap", "--mfa-remember", "10m", "--drain-timeout", "120s", "--takeover-socket", e.tk}
	a := e.serve("A", flags...)
	a.waitLog(t, 60*time.Second, "takeover socket listening")

	// alice's code, once: the rest of her logins are remembered (A).
	code := e.code("alice")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := e.login(ctx, "alice", code); err != nil {
		t.Fatalf("first login: %v", err)
	}

	// An idle session of bob's, for a cancel and a --kill through B.
	bobCfg, err := pgx.ParseConfig(pgcluster.DSN("127.0.0.1", e.port, "bob", fleetPW, "app") + "&options=-c%20pgmfa.code%3D" + e.code("bob"))
	if err != nil {
		t.Fatal(err)
	}
	idle, err := pgx.ConnectConfig(ctx, bobCfg)
	if err != nil {
		t.Fatalf("bob's login: %v", err)
	}
	defer idle.Close(context.Background())

	fast := make(chan struct{})
	var copyRead atomic.Int64
	type copyRes struct {
		hash string
		n    int64
		err  error
	}
	copyDone := make(chan copyRes, 1)
	go func() {
		h, n, err := copyHash(t, "127.0.0.1", e.port, "alice", code, fast, &copyRead)
		copyDone <- copyRes{h, n, err}
	}()
	benchDone := make(chan string, 1)
	go func() {
		cmd := exec.Command("pgbench", "-n", "-S", "-c", "16", "-j", "2", "-T", "40",
			"-h", "127.0.0.1", "-p", strconv.Itoa(e.port), "-U", "alice", "app")
		cmd.Env = append(os.Environ(), "PGPASSWORD="+fleetPW, "PGOPTIONS=-c pgmfa.code="+code, "PGSSLMODE=disable")
		out, err := cmd.CombinedOutput()
		if err != nil {
			out = append(out, []byte("\nexit: "+err.Error())...)
		}
		benchDone <- string(out)
	}()
	var before []admin.Session
	if !eventually(60*time.Second, func() bool { before = e.sessions(a); return len(before) >= 18 }) {
		t.Fatalf("A lists %d sessions, want 18 (16 pgbench, 1 COPY, bob's)", len(before))
	}
	for _, s := range before {
		if s.Mode != "sockmap" {
			t.Fatalf("session %d is carried by %s, not spliced", s.ID, s.Mode)
		}
	}

	// New logins (svc: no MFA) all through the takeover.
	stopLogins := make(chan struct{})
	var logins, loginErrs atomic.Int64
	var firstErr atomic.Value
	loginsDone := make(chan struct{})
	go func() {
		defer close(loginsDone)
		for {
			select {
			case <-stopLogins:
				return
			default:
			}
			lctx, lcancel := context.WithTimeout(ctx, 60*time.Second)
			err := e.login(lctx, "svc", "")
			lcancel()
			logins.Add(1)
			if err != nil {
				loginErrs.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	mport, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	bMetrics := "127.0.0.1:" + strconv.Itoa(mport)
	b := e.serve("B", append(flags, "--takeover", e.tk, "--metrics", bMetrics)...)
	select {
	case <-a.done:
	case <-time.After(3 * time.Minute):
		t.Fatalf("A did not exit after the takeover:\n%s", a.log())
	}
	if a.err != nil {
		t.Fatalf("A exited with %v", a.err)
	}
	if got := copyRead.Load(); got >= size {
		t.Fatalf("the COPY had finished (%d bytes) before the takeover completed: it proves nothing", got)
	}
	if !strings.Contains(b.log(), "privileges dropped") {
		t.Fatalf("B kept its capabilities: the test would not show that adopting needs none:\n%s", b.log())
	}
	if !strings.Contains(a.log(), "takeover complete") || !strings.Contains(b.log(), "takeover complete") {
		t.Fatalf("no 'takeover complete' in the logs:\nA:\n%s\nB:\n%s", a.log(), b.log())
	}
	after := e.sessions(b)
	owned := map[uint64]bool{}
	for _, s := range after {
		owned[s.ID] = true
	}
	for _, s := range before {
		if !owned[s.ID] {
			t.Fatalf("session %d (%s) of A is not listed by B: %+v", s.ID, s.User, after)
		}
	}
	t.Logf("B lists %d sessions after the takeover; the COPY had read %d of %d bytes", len(after), copyRead.Load(), size)
	// B's metrics count the adopted sessions as open.
	if _, m := scrape(t, bMetrics); m[`pgmfa_sessions_open{mode="sockmap"}`] < float64(len(before)) {
		t.Fatalf("B's pgmfa_sessions_open{mode=\"sockmap\"} is %v; it adopted %d", m[`pgmfa_sessions_open{mode="sockmap"}`], len(before))
	}
	if _, err := os.Stat(e.tk); err != nil {
		t.Fatalf("B has no takeover socket: %v", err)
	}
	// MFA works in B too.
	if err := e.login(ctx, "carol", e.code("carol")); err != nil {
		t.Fatalf("carol's login through B: %v", err)
	}
	// B routes the cancel of an adopted session (pgx cancels through the
	// proxy's address when the context ends) and ends it on --kill.
	var bobID uint64
	for _, s := range before {
		if s.User == "bob" {
			bobID = s.ID
		}
	}
	go func() {
		time.Sleep(2 * time.Second)
		// A CancelRequest with the key bob's client got from A, to B.
		if err := idle.PgConn().CancelRequest(ctx); err != nil {
			t.Errorf("cancel request: %v", err)
		}
	}()
	_, err = idle.Exec(ctx, "select pg_sleep(60)")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57014" {
		t.Fatalf("pg_sleep(60) on an adopted session, cancelled through B: %v, want 57014", err)
	}
	if out, err := e.run("sessions", "--admin", b.admin, "--kill", strconv.FormatUint(bobID, 10)); err != nil {
		t.Fatalf("pgmfa sessions --kill %d on B: %v\n%s", bobID, err, out)
	}
	b.waitLog(t, 30*time.Second, fmt.Sprintf("session end\" conn=%d ", bobID))
	if !strings.Contains(b.log(), `reason="ended by pgmfa sessions --kill"`) {
		t.Fatalf("B did not end bob's adopted session on --kill:\n%s", b.log())
	}

	// And again: C takes over from B, which hands over its own Splicer
	// (bob's and carol's sessions were B's) and the one it adopted.
	c := e.serve("C", append(flags, "--takeover", e.tk)...)
	select {
	case <-b.done:
	case <-time.After(3 * time.Minute):
		t.Fatalf("B did not exit after C took over:\n%s", b.log())
	}
	if b.err != nil {
		t.Fatalf("B exited with %v", b.err)
	}
	left := e.sessions(c)
	ownedC := map[uint64]bool{}
	for _, s := range left {
		ownedC[s.ID] = true
	}
	for _, s := range before {
		if s.User == "alice" && !ownedC[s.ID] {
			t.Fatalf("alice's session %d is not listed by C: %+v", s.ID, left)
		}
	}
	if got := copyRead.Load(); got >= size {
		t.Fatalf("the COPY had finished (%d bytes) before the second takeover", got)
	}
	b = c // the session ends are C's now

	close(fast)
	cr := <-copyDone
	if cr.err != nil || cr.hash != want || cr.n != size {
		t.Fatalf("COPY across the takeover: %d bytes %s (%v); direct: %d bytes %s", cr.n, cr.hash, cr.err, size, want)
	}
	out := <-benchDone
	if !strings.Contains(out, "number of failed transactions: 0") || strings.Contains(out, "aborted") || strings.Contains(out, "exit:") {
		t.Fatalf("pgbench across the takeover:\n%s", out)
	}
	close(stopLogins)
	<-loginsDone
	if loginErrs.Load() > 0 || logins.Load() == 0 {
		t.Fatalf("%d of %d logins during the takeover failed; first: %v", loginErrs.Load(), logins.Load(), firstErr.Load())
	}
	// B writes the end of every session it took over.
	for _, s := range before {
		if s.ID == bobID {
			continue // killed in B
		}
		line := fmt.Sprintf("session end\" conn=%d ", s.ID)
		b.waitLog(t, 30*time.Second, line)
	}
	t.Logf("%d logins during the takeover, all succeeded; pgbench:\n%s", logins.Load(), out)
	for _, p := range []*serveProc{a, b} { // b is C here
		for _, l := range strings.Split(p.log(), "\n") {
			if strings.Contains(l, "takeover") {
				t.Logf("%s: %s", p.name, l)
			}
		}
	}
}

// TestTakeoverRefused: --takeover where nothing listens, where something
// that is not a pgmfa listens, or with other --listen addresses fails
// with a clear error; a peer that is not a pgmfa, on A's takeover socket,
// leaves A serving.
func TestTakeoverRefused(t *testing.T) {
	e := newTakeoverEnv(t, 0)
	a := e.serve("A", "--takeover-socket", e.tk)
	a.waitLog(t, 60*time.Second, "takeover socket listening")

	out, err := e.run("serve", "--listen", "127.0.0.1:"+strconv.Itoa(e.port), "--upstream", e.db.Addr(), "--store", e.store,
		"--store-key-file", "", "--admin", "", "--takeover", filepath.Join(t.TempDir(), "nothing.sock"))
	if err == nil || !strings.Contains(out, "no pgmfa listens on the takeover socket") {
		t.Fatalf("--takeover where nothing listens: %v\n%s", err, out)
	}

	// Something else on a unix socket: an HTTP-ish server.
	other := filepath.Join(t.TempDir(), "other.sock")
	ln, err := net.Listen("unix", other)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"))
			c.Close()
		}
	}()
	out, err = e.run("serve", "--listen", "127.0.0.1:"+strconv.Itoa(e.port), "--upstream", e.db.Addr(), "--store", e.store,
		"--store-key-file", "", "--admin", "", "--takeover", other)
	if err == nil || !strings.Contains(out, "not a pgmfa takeover socket") {
		t.Fatalf("--takeover on a socket that is not a pgmfa's: %v\n%s", err, out)
	}

	// Other listen addresses: A refuses, and serves on.
	port2, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	out, err = e.run("serve", "--listen", "127.0.0.1:"+strconv.Itoa(port2), "--upstream", e.db.Addr(), "--store", e.store,
		"--store-key-file", "", "--admin", "", "--takeover", e.tk)
	if err == nil || !strings.Contains(out, "a takeover keeps the listeners") {
		t.Fatalf("--takeover with another --listen: %v\n%s", err, out)
	}

	// A garbage peer on A's takeover socket.
	c, err := net.Dial("unix", e.tk)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	_, _ = io.Copy(io.Discard, c)
	c.Close()
	a.waitLog(t, 30*time.Second, "takeover failed; this process serves on")

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := e.login(ctx, "alice", e.code("alice")); err != nil {
		t.Fatalf("A after the refused takeovers: %v", err)
	}
	if a.exited() {
		t.Fatalf("A exited:\n%s", a.log())
	}
}

// TestTakeoverDrainsRelayed: sessions in the user-space relay are not
// handed over: the old process keeps them until they end (a drain), then
// exits 0, while the new one serves the new logins, on a unix-socket
// listener too (whose path outlives the old process).
func TestTakeoverDrainsRelayed(t *testing.T) {
	e := newTakeoverEnv(t, 0)
	// A unix-socket listener too: handed over, and its path kept.
	dir := t.TempDir()
	sock := filepath.Join(dir, fmt.Sprintf(".s.PGSQL.%d", e.port))
	flags := []string{"--splice", "off", "--drain-timeout", "120s", "--takeover-socket", e.tk,
		"--listen", fmt.Sprintf("127.0.0.1:%d,%s", e.port, dir)}
	a := e.serve("A", flags...)
	a.waitLog(t, 60*time.Second, "takeover socket listening")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgcluster.DSN("127.0.0.1", e.port, "svc", fleetPW, "app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	b := e.serve("B", append(flags, "--takeover", e.tk)...)
	a.waitLog(t, 60*time.Second, "takeover complete")
	if err := e.login(ctx, "alice", e.code("alice")); err != nil {
		t.Fatalf("a login during the takeover: %v", err)
	}
	// The relayed session still works, in A.
	var one int
	if err := conn.QueryRow(ctx, "select 1").Scan(&one); err != nil {
		t.Fatalf("the relayed session after the takeover: %v", err)
	}
	if a.exited() {
		t.Fatalf("A exited with a relayed session open:\n%s", a.log())
	}
	conn.Close(ctx)
	select {
	case <-a.done:
	case <-time.After(time.Minute):
		t.Fatalf("A did not exit once its relayed session ended:\n%s", a.log())
	}
	if a.err != nil {
		t.Fatalf("A exited with %v", a.err)
	}
	if !strings.Contains(a.log(), "mode=relay") || !strings.Contains(a.log(), "drain finished") {
		t.Fatalf("A did not drain its relayed session:\n%s", a.log())
	}
	if b.exited() {
		t.Fatalf("B exited:\n%s", b.log())
	}
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("the unix-socket listener's path is gone after A exited: %v", err)
	}
	uc, err := pgx.Connect(ctx, fmt.Sprintf("host=%s port=%d user=svc password=%s dbname=app", dir, e.port, fleetPW))
	if err != nil {
		t.Fatalf("a login through the unix socket B took over: %v", err)
	}
	uc.Close(ctx)
}
