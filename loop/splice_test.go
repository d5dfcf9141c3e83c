package loop_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
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
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/pgmfa/pgmfa/proto"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/mfa"
)

// spliceModes are the handoff paths every data-path test runs through.
func spliceModes(t *testing.T) []string {
	modes := []string{loop.SpliceOff}
	if err := bpf.Probe(); err != nil {
		if pgtest.InCI() {
			t.Fatalf("kernel splicing must be available in CI: %v", err)
		}
		t.Logf("sockmap path not tested: %v", err)
		return modes
	}
	return append(modes, loop.SpliceSockmap)
}

var bigTableOnce sync.Once

// bigTable creates a ~100 MB table once for the whole package.
func bigTable(t *testing.T, pg interface {
	PsqlDB(string, string) (string, error)
}) {
	bigTableOnce.Do(func() {
		_, err := pg.PsqlDB("app", `create table if not exists big as
			select g, md5(g::text) || repeat('x', 200) as payload, g * 0.5 as half
			from generate_series(1, 400000) g;
			grant select on big to public;`)
		if err != nil {
			t.Fatal(err)
		}
	})
}

// copyOutHash runs psql \copy and hashes what arrives.
func copyOutHash(t *testing.T, host string, port int, user, pw, code string) (string, int64) {
	t.Helper()
	cmd := exec.Command("psql", "-X", "-h", host, "-p", strconv.Itoa(port), "-U", user, "-d", "app",
		"-c", `\copy (select * from big order by g) to stdout`)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+pw, "PGSSLMODE=disable", "PGOPTIONS=")
	if code != "" {
		cmd.Env = append(cmd.Env, "PGOPTIONS=-c pgmfa.code="+code)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	n, _ := io.Copy(h, stdout)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("psql \\copy: %v\n%s", err, stderr.String())
	}
	return hex.EncodeToString(h.Sum(nil)), n
}

// TestCopyOutMatchesDirect: psql \copy of a ~100 MB table through each
// handoff path is byte-identical to the same \copy made directly.
func TestCopyOutMatchesDirect(t *testing.T) {
	pg := cluster(t)
	bigTable(t, pg)
	want, size := copyOutHash(t, pg.Host, pg.Port, svc, svcPW, "")
	if size < 90<<20 {
		t.Fatalf("direct \\copy gave only %d bytes", size)
	}
	for _, mode := range spliceModes(t) {
		t.Run(mode, func(t *testing.T) {
			p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Splice = mode })
			got, n := copyOutHash(t, p.host, p.port, alice, alicePW, p.code(alice))
			if got != want || n != size {
				t.Fatalf("through %s: %d bytes sha256 %s; direct: %d bytes %s", mode, n, got, size, want)
			}
			st := p.srv.StatsSnapshot()
			if mode == loop.SpliceSockmap && st["spliced"] == 0 {
				t.Fatalf("no session was spliced: %v", st)
			}
			if mode == loop.SpliceOff && st["relayed"] == 0 {
				t.Fatalf("no session was relayed: %v", st)
			}
		})
	}
}

// TestExtendedProtocolLargeBinary: pgx's extended protocol with large
// binary parameters and results, compared by hash on both ends.
func TestExtendedProtocolLargeBinary(t *testing.T) {
	for _, mode := range spliceModes(t) {
		t.Run(mode, func(t *testing.T) {
			p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Splice = mode })
			ctx := context.Background()
			conn, err := pgx.Connect(ctx, p.dsn(svc, svcPW, "app", ""))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			for _, size := range []int{0, 1, 8 << 10, 1 << 20, 16 << 20} {
				blob := make([]byte, size)
				rand.Read(blob)
				sum := sha256.Sum256(blob)
				var back []byte
				var serverSum string
				err := conn.QueryRow(ctx, "select $1::bytea, encode(sha256($1::bytea), 'hex')", blob).Scan(&back, &serverSum)
				if err != nil {
					t.Fatalf("%d bytes: %v", size, err)
				}
				if !bytes.Equal(back, blob) || serverSum != hex.EncodeToString(sum[:]) {
					t.Fatalf("%d bytes: round trip or server hash differs", size)
				}
			}
			// A prepared statement reused many times (Parse once, Bind/Execute often).
			for i := 0; i < 200; i++ {
				var n int
				if err := conn.QueryRow(ctx, "select $1::int * 2", i).Scan(&n); err != nil || n != 2*i {
					t.Fatalf("iteration %d: %d %v", i, n, err)
				}
			}
		})
	}
}

// TestPgbenchSelectOnly16: pgbench -S with 16 clients over each path.
func TestPgbenchSelectOnly16(t *testing.T) {
	if _, err := exec.LookPath("pgbench"); err != nil {
		t.Skip("pgbench not installed")
	}
	pg := cluster(t)
	initPgbench(t, pg.Host, pg.Port)
	for _, mode := range spliceModes(t) {
		t.Run(mode, func(t *testing.T) {
			p := startProxy(t, mfa.Options{Remember: time.Minute}, func(c *loop.Config) { c.Splice = mode })
			cmd := exec.Command("pgbench", "-n", "-S", "-c", "16", "-j", "2", "-T", "3",
				"-h", p.host, "-p", strconv.Itoa(p.port), "-U", alice, "app")
			cmd.Env = append(os.Environ(), "PGPASSWORD="+alicePW, "PGOPTIONS=-c pgmfa.code="+p.code(alice), "PGSSLMODE=disable")
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "number of failed transactions: 0") {
				t.Fatalf("pgbench: %v\n%s", err, out)
			}
		})
	}
}

var pgbenchOnce sync.Once

func initPgbench(t *testing.T, host string, port int) {
	pgbenchOnce.Do(func() {
		cmd := exec.Command("pgbench", "-i", "-q", "-s", "1", "-h", host, "-p", strconv.Itoa(port), "-U", alice, "app")
		cmd.Env = append(os.Environ(), "PGPASSWORD="+alicePW, "PGOPTIONS=")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("pgbench -i: %v\n%s", err, out)
		}
	})
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	return len(ents)
}

// TestSessionEndings: a client killed mid-result and a backend terminated
// mid-query end the session on the other side too, and leave no fd, no
// session and no database backend behind.
func TestSessionEndings(t *testing.T) {
	pg := cluster(t)
	bigTable(t, pg)
	for _, mode := range spliceModes(t) {
		t.Run(mode, func(t *testing.T) {
			p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Splice = mode })
			ctx := context.Background()
			// Warm up the pools (goroutines, buffers) before counting fds.
			if c, err := pgx.Connect(ctx, p.dsn(svc, svcPW, "app", "")); err == nil {
				c.Close(ctx)
			}
			time.Sleep(100 * time.Millisecond)
			fdsBefore := openFDs(t)

			// 1. The client dies in the middle of a large result.
			raw, err := pgconn.Connect(ctx, p.dsn(svc, svcPW, "app", ""))
			if err != nil {
				t.Fatal(err)
			}
			rr := raw.ExecParams(ctx, "select * from big", nil, nil, nil, nil)
			rr.NextRow()
			if tcp, ok := raw.Conn().(*net.TCPConn); ok {
				tcp.SetLinger(0)
			}
			raw.Conn().Close() // a reset, as when a client process is killed
			if !eventually(10*time.Second, func() bool { return backends(t, pg, svc) == 0 }) {
				t.Fatalf("the backend of a killed client is still there (%d)", backends(t, pg, svc))
			}

			// 2. The backend is terminated while the client waits on a query.
			conn, err := pgx.Connect(ctx, p.dsn(svc, svcPW, "app", ""))
			if err != nil {
				t.Fatal(err)
			}
			var pid int
			conn.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid)
			go func() {
				time.Sleep(300 * time.Millisecond)
				pg.Psql(fmt.Sprintf("select pg_terminate_backend(%d)", pid))
			}()
			_, err = conn.Exec(ctx, "select pg_sleep(30)")
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "57P01" {
				t.Fatalf("want 57P01 admin_shutdown, got %v", err)
			}
			conn.Close(ctx)

			// 3. Orderly: the client says Terminate and closes.
			conn, err = pgx.Connect(ctx, p.dsn(svc, svcPW, "app", ""))
			if err != nil {
				t.Fatal(err)
			}
			conn.Close(ctx)

			if !eventually(10*time.Second, func() bool { return p.srv.StatsSnapshot()["active"] == 0 }) {
				t.Fatalf("sessions still active: %v", p.srv.StatsSnapshot())
			}
			if !eventually(5*time.Second, func() bool { return openFDs(t) <= fdsBefore }) {
				t.Fatalf("fd leak: %d open before, %d after", fdsBefore, openFDs(t))
			}
			if !eventually(10*time.Second, func() bool { return backends(t, pg, svc) == 0 }) {
				t.Fatal("database backends left behind")
			}
		})
	}
}

// TestUnixSockets: clients on a unix socket (psql -h DIR) and a unix-socket
// upstream, through each handoff path; and TCP clients to a unix-socket
// upstream, which the sockmap splices: a \copy of the 100 MB table is
// byte-identical to a direct one, and pgbench -S -c 8 has no failure.
func TestUnixSockets(t *testing.T) {
	pg := cluster(t)
	bigTable(t, pg)
	initPgbench(t, pg.Host, pg.Port)
	if _, err := pg.PsqlDB("app", "grant select on pgbench_accounts, pgbench_branches to svc"); err != nil {
		t.Fatal(err)
	}
	want, size := copyOutHash(t, pg.Host, pg.Port, svc, svcPW, "")
	for _, mode := range spliceModes(t) {
		t.Run(mode+"/tcp-client", func(t *testing.T) {
			p := startProxy(t, mfa.Options{}, func(c *loop.Config) {
				c.Splice = mode
				c.Upstream = pg.SocketPath()
			})
			if got, n := copyOutHash(t, p.host, p.port, alice, alicePW, p.code(alice)); got != want || n != size {
				t.Fatalf("\\copy through %s to a unix upstream: %d bytes %s; direct %d bytes %s", mode, n, got, size, want)
			}
			cmd := exec.Command("pgbench", "-n", "-S", "-c", "8", "-j", "2", "-T", "2", "-h", p.host, "-p", strconv.Itoa(p.port), "-U", svc, "app")
			cmd.Env = append(os.Environ(), "PGPASSWORD="+svcPW, "PGSSLMODE=disable")
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "number of failed transactions: 0") {
				t.Fatalf("pgbench through %s to a unix upstream: %v\n%s", mode, err, out)
			}
			st := p.srv.StatsSnapshot()
			if mode != loop.SpliceSockmap {
				return
			}
			if err := bpf.ProbeUnixUpstreams(); err != nil {
				// A property of the kernel (see bpf.load): such sessions
				// must then all be relayed, and work.
				t.Logf("unix upstreams are relayed here: %v", err)
				if st["relayed"] < 9 || st["spliced"] != 0 {
					t.Fatalf("sessions to a unix upstream were not all relayed: %v\n%s", st, p.logs.String())
				}
				return
			}
			if st["spliced"] < 9 || st["relayed"] != 0 {
				t.Fatalf("sessions to a unix upstream were not all spliced: %v\n%s", st, p.logs.String())
			}
		})
	}
	for _, mode := range spliceModes(t) {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			os.Chmod(dir, 0o755)
			p := startProxy(t, mfa.Options{}, func(c *loop.Config) {
				c.Splice = mode
				c.Upstream = pg.SocketPath()
				c.Listen = append(c.Listen, dir)
			})
			cmd := exec.Command("psql", "-X", "-At", "-h", dir, "-p", strconv.Itoa(p.port), "-U", alice, "-d", "app",
				"-c", "select count(*) from generate_series(1, 100000)")
			cmd.Env = append(os.Environ(), "PGPASSWORD="+alicePW, "PGOPTIONS=-c pgmfa.code="+p.code(alice))
			out, err := cmd.CombinedOutput()
			if err != nil || strings.TrimSpace(string(out)) != "100000" {
				t.Fatalf("psql over unix sockets: %v\n%s", err, out)
			}
		})
	}
}

// TestUnprivilegedProxy: the proxy binary run as an unprivileged user
// (no BPF rights) logs why it cannot splice, relays instead, and works;
// --splice sockmap refuses to start with a clear reason.
func TestUnprivilegedProxy(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the proxy as another user")
	}
	nob, err := user.Lookup("nobody")
	if err != nil {
		t.Skip("no nobody user")
	}
	uid, _ := strconv.Atoi(nob.Uid)
	gid, _ := strconv.Atoi(nob.Gid)
	pg := cluster(t)
	// Not t.TempDir(): its parent is 0700, and nobody must reach the binary.
	dir, err := os.MkdirTemp("", "pgmfa-unpriv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "pgmfa")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/pgmfa").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	storeDir := filepath.Join(dir, "store")
	os.Mkdir(storeDir, 0o700)
	os.Chown(storeDir, uid, gid)
	store, err := mfa.OpenFileStore(filepath.Join(storeDir, "totp.json"))
	if err != nil {
		t.Fatal(err)
	}
	key, err := store.Enroll(alice, mfa.EnrollOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	os.Chown(filepath.Join(storeDir, "totp.json"), uid, gid)

	run := func(splice string) (*exec.Cmd, *syncBuffer, int) {
		port, _ := pgcluster.FreePort()
		cmd := exec.Command(bin, "serve", "--listen", "127.0.0.1:"+strconv.Itoa(port), "--upstream", pg.Addr(),
			"--store", filepath.Join(storeDir, "totp.json"), "--admin", filepath.Join(storeDir, "admin.sock"),
			"--splice", splice)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
		logs := &syncBuffer{}
		cmd.Stderr = logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd, logs, port
	}

	// --splice sockmap: refuses to start, says why.
	cmd, logs, _ := run("sockmap")
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(logs.String(), "splice") {
			t.Fatalf("--splice sockmap as nobody: exit %v, log:\n%s", err, logs.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("--splice sockmap as nobody did not refuse to start")
	}

	// --splice auto: starts, says why it relays, serves.
	_, logs, port := run("auto")
	if !eventually(20*time.Second, func() bool {
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err == nil {
			c.Close()
		}
		return err == nil
	}) {
		t.Fatalf("unprivileged proxy did not start:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "kernel splicing unavailable") {
		t.Fatalf("no log line saying why splicing is off:\n%s", logs.String())
	}
	code, _ := totpCode(key.Secret())
	p := &proxy{t: t, pg: pg, host: "127.0.0.1", port: port}
	out, stderr, err := p.psql(alice, alicePW, code, "select 'relayed'")
	if err != nil || out != "relayed" {
		t.Fatalf("through the unprivileged proxy: %q %v\n%s\n%s", out, err, stderr, logs.String())
	}
}

// TestHandoffAfterClientFIN: a client pipelines a query and Terminate behind
// its last auth message and half-closes at once, so its socket already has
// FIN when the session is handed off (which the kernel may refuse to
// insert). The query is still answered and the session ends cleanly.
func TestHandoffAfterClientFIN(t *testing.T) {
	for _, mode := range spliceModes(t) {
		t.Run(mode, func(t *testing.T) {
			p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Splice = mode })
			mk := marker(t)
			c := dialRaw(t, p)
			scramLogin(t, c, alice, alicePW, p.code(alice), func(final []byte) {
				q := proto.Append(nil, &pgproto3.Query{String: "select '" + mk + "'"}, &pgproto3.Terminate{})
				c.write(append(final, q...))
				c.conn.(*net.TCPConn).CloseWrite()
			})
			var gotRow bool
			for {
				m, err := c.nextRaw()
				if err != nil {
					break // EOF after Terminate
				}
				if m.Type == 'D' && bytes.Contains(m.Body, []byte(mk)) {
					gotRow = true
				}
				if m.Type == 'E' {
					t.Fatalf("error: %q", m.Body)
				}
			}
			if !gotRow {
				t.Fatalf("the pipelined query was not answered\n%s", p.logs.String())
			}
			if !eventually(10*time.Second, func() bool { return p.srv.StatsSnapshot()["active"] == 0 }) {
				t.Fatalf("session still active: %v", p.srv.StatsSnapshot())
			}
		})
	}
}

// TestCopyIn: psql \copy FROM a ~200 MB file. The client sends far faster
// than PostgreSQL ingests, so the bytes it is ahead by must be held back
// somewhere on the way. Through the relay, through the sockmap with a
// bound above the upload, and through the sockmap with default flags (flow
// control is entered and the session is not ended) the load must equal the
// same \copy made directly. TestFlowUpload covers the larger workloads.
func TestCopyIn(t *testing.T) {
	pg := cluster(t)
	file := filepath.Join(t.TempDir(), "upload.tsv")
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	pad := strings.Repeat("y", 180)
	for g := range 800_000 {
		fmt.Fprintf(w, "%d\t%x-%s\n", g, sha256.Sum256([]byte(strconv.Itoa(g))), pad)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	const summary = "select count(*) || ' ' || coalesce(sum(g::bigint), 0) || ' ' || coalesce(sum(hashtext(payload)::bigint), 0) from %s"
	load := func(t *testing.T, host string, port int, user, pw, code, table string) (string, error) {
		t.Helper()
		if _, err := pg.PsqlDB("app", fmt.Sprintf("drop table if exists %[1]s; create unlogged table %[1]s (g int, payload text); grant all on %[1]s to public;", table)); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", strconv.Itoa(port), "-U", user, "-d", "app",
			"-c", `\copy `+table+` from '`+file+`'`)
		cmd.Env = append(os.Environ(), "PGPASSWORD="+pw, "PGSSLMODE=disable", "PGOPTIONS=")
		if code != "" {
			cmd.Env = append(cmd.Env, "PGOPTIONS=-c pgmfa.code="+code)
		}
		out, runErr := cmd.CombinedOutput()
		if runErr != nil {
			runErr = fmt.Errorf("psql \\copy from: %v\n%s", runErr, out)
		}
		got, err := pg.PsqlDB("app", fmt.Sprintf(summary, table))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(got), runErr
	}
	want, err := load(t, pg.Host, pg.Port, svc, svcPW, "", "upload_direct")
	if err != nil || !strings.HasPrefix(want, "800000 ") {
		t.Fatalf("direct \\copy from loaded %q: %v", want, err)
	}
	for _, mode := range spliceModes(t) {
		t.Run(mode, func(t *testing.T) {
			p := startProxy(t, mfa.Options{}, func(c *loop.Config) {
				c.Splice = mode
				c.MaxBacklog = 1 << 30
			})
			if got, err := load(t, p.host, p.port, alice, alicePW, p.code(alice), "upload_"+mode); got != want || err != nil {
				t.Fatalf("through %s loaded %q (%v); direct %q\nproxy log:\n%s", mode, got, err, want, p.logs.String())
			}
		})
	}
	for _, mode := range spliceModes(t) {
		if mode != loop.SpliceSockmap {
			continue
		}
		t.Run("sockmap-default-bound", func(t *testing.T) {
			p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Splice = mode })
			got, err := load(t, p.host, p.port, alice, alicePW, p.code(alice), "upload_bounded")
			if err != nil || got != want {
				t.Errorf("with default flags loaded %q (%v); direct %q", got, err, want)
			}
			if !eventually(10*time.Second, func() bool { return p.srv.StatsSnapshot()["active"] == 0 }) {
				t.Fatalf("session still active: %v", p.srv.StatsSnapshot())
			}
			ends := sessionEnds(p.logs.String())
			if len(ends) != 1 || ends[0]["mode"] != "sockmap" {
				t.Fatalf("want one spliced session, got %d session-end lines\n%s", len(ends), p.logs.String())
			}
			// psql sends the file far faster than PostgreSQL ingests it
			// (measured: ~190 of 200 MB moved under flow control), so the
			// default flags must have met the pressure: flow control was
			// entered and the session was not ended at the bound.
			assertFlowControl(t, ends[0])
			assertCleanEnd(t, ends[0])
		})
	}
}
