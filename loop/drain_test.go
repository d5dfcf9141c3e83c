package loop_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"hash"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/loop"
)

// The tests here run `pgmfa serve` (startServe) and its signals, and
// `pgmfa sessions` against its admin API.

// connectSvc opens a session of the exempt user svc through the proxy.
func (p *serveProc) connectSvc(t *testing.T) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, pgcluster.DSN(p.host, p.port, svc, svcPW, "app"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func backendPID(t *testing.T, c *pgx.Conn) int {
	t.Helper()
	var pid int
	if err := c.QueryRow(context.Background(), "select pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

// backendGone waits until pid is no longer in pg_stat_activity.
func backendGone(t *testing.T, pg *pgcluster.Cluster, pid string) {
	t.Helper()
	if !eventually(20*time.Second, func() bool {
		out, err := pg.Psql("select count(*) from pg_stat_activity where pid = " + pid)
		return err == nil && out == "0"
	}) {
		t.Fatalf("backend %s is still in pg_stat_activity", pid)
	}
}

// runPgmfa runs the pgmfa binary and returns its exit status and output.
func runPgmfa(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(buildPgmfa(t), args...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return exitStatus(err), stdout.String(), stderr.String()
}

// TestSessionsCommand: `pgmfa sessions` lists a spliced (or relayed)
// session through the admin API, as a table and as JSON; --kill of an
// unknown id fails clearly and disturbs nothing; --kill ID ends the session
// and its backend.
func TestSessionsCommand(t *testing.T) {
	pg := cluster(t)
	for _, mode := range spliceModes(t) {
		t.Run(mode, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "admin.sock")
			p := startServe(t, 0, "--admin", sock, "--splice", mode)
			c := p.connectSvc(t)
			pid := backendPID(t, c)

			code, out, errOut := runPgmfa(t, "sessions", "--admin", sock, "--json")
			if code != 0 {
				t.Fatalf("pgmfa sessions --json: exit %d\n%s", code, errOut)
			}
			var list struct {
				Sessions []struct {
					ID                           uint64
					User, Database, Client, Mode string
					C2S                          uint64  `json:"client_to_server"`
					S2C                          uint64  `json:"server_to_client"`
					AgeSeconds                   float64 `json:"age_seconds"`
				}
			}
			if err := json.Unmarshal([]byte(out), &list); err != nil {
				t.Fatalf("--json output does not parse: %v\n%s", err, out)
			}
			want := map[string]string{loop.SpliceSockmap: "sockmap", loop.SpliceOff: "relay"}[mode]
			if len(list.Sessions) != 1 {
				t.Fatalf("want one session, got %s", out)
			}
			s := list.Sessions[0]
			if s.User != svc || s.Database != "app" || s.Mode != want || s.C2S == 0 || s.S2C == 0 || s.Client != c.PgConn().Conn().LocalAddr().String() {
				t.Fatalf("session listed as %s; want user %s, database app, mode %s, client %s, bytes both ways", out, svc, want, c.PgConn().Conn().LocalAddr())
			}

			code, out, errOut = runPgmfa(t, "sessions", "--admin", sock)
			if code != 0 || !strings.Contains(out, "CONN") || !strings.Contains(out, " "+svc+" ") || !strings.Contains(out, want) {
				t.Fatalf("pgmfa sessions: exit %d\n%s%s", code, out, errOut)
			}
			t.Logf("pgmfa sessions:\n%s", out)

			bad := strconv.FormatUint(s.ID+1000, 10)
			code, _, errOut = runPgmfa(t, "sessions", "--admin", sock, "--kill", bad)
			if code != 1 || !strings.Contains(errOut, "no live session has id "+bad) {
				t.Fatalf("--kill of an unknown id: exit %d, %q", code, errOut)
			}
			var one int
			if err := c.QueryRow(context.Background(), "select 1").Scan(&one); err != nil {
				t.Fatalf("the session was disturbed by a kill of an unknown id: %v", err)
			}

			code, out, errOut = runPgmfa(t, "sessions", "--admin", sock, "--kill", strconv.FormatUint(s.ID, 10))
			if code != 0 || !strings.Contains(out, "ended session "+strconv.FormatUint(s.ID, 10)) {
				t.Fatalf("--kill %d: exit %d\n%s%s", s.ID, code, out, errOut)
			}
			if err := c.QueryRow(context.Background(), "select 1").Scan(&one); err == nil {
				t.Fatal("a query succeeded on a killed session")
			}
			backendGone(t, pg, strconv.Itoa(pid))
			code, out, _ = runPgmfa(t, "sessions", "--admin", sock)
			if code != 0 || !strings.Contains(out, "no open sessions") {
				t.Fatalf("after the kill: exit %d\n%s", code, out)
			}
		})
	}
}

// gatedWriter hashes what it is given and, once it has more than gateAt
// bytes, blocks until release is closed (a COPY held in the middle).
type gatedWriter struct {
	h       hash.Hash
	n       int64
	gateAt  int64
	reached chan struct{}
	release chan struct{}
	once    sync.Once
}

func (w *gatedWriter) Write(b []byte) (int, error) {
	w.h.Write(b)
	w.n += int64(len(b))
	if w.n > w.gateAt {
		w.once.Do(func() { close(w.reached) })
		<-w.release
	}
	return len(b), nil
}

const bigCopy = "copy (select * from big order by g) to stdout"

// directCopyHash is the sha256 and size of bigCopy made directly.
func directCopyHash(t *testing.T, pg *pgcluster.Cluster) (string, int64) {
	t.Helper()
	ctx := context.Background()
	c, err := pgx.Connect(ctx, pgcluster.DSN(pg.Host, pg.Port, svc, svcPW, "app"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	h := sha256.New()
	w := &gatedWriter{h: h, gateAt: 1 << 62}
	if _, err := c.PgConn().CopyTo(ctx, w, bigCopy); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil)), w.n
}

func refused(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

// TestDrainOnSIGTERM: SIGTERM stops accepting at once (connection
// refused) while an idle session keeps working and a COPY in the middle of
// its stream completes byte-identically; the process exits once both
// sessions have ended, having cut nothing.
func TestDrainOnSIGTERM(t *testing.T) {
	pg := cluster(t)
	bigTable(t, pg)
	want, size := directCopyHash(t, pg)
	p := startServe(t, 0, "--drain-timeout", "120s")
	idle := p.connectSvc(t)
	busy := p.connectSvc(t)
	w := &gatedWriter{h: sha256.New(), gateAt: 1 << 20, reached: make(chan struct{}), release: make(chan struct{})}
	copied := make(chan error, 1)
	go func() {
		_, err := busy.PgConn().CopyTo(context.Background(), w, bigCopy)
		copied <- err
	}()
	<-w.reached

	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if !eventually(10*time.Second, func() bool { return refused(p.addr()) }) {
		t.Fatal("new connections are not refused after SIGTERM")
	}
	if !eventually(10*time.Second, func() bool { return strings.Contains(p.logs.String(), "draining") }) {
		t.Fatalf("no drain in the log:\n%s", p.logs.String())
	}
	var one int
	if err := idle.QueryRow(context.Background(), "select 1").Scan(&one); err != nil {
		t.Fatalf("the idle session does not work during the drain: %v", err)
	}
	if !p.alive() {
		t.Fatal("pgmfa exited with sessions open")
	}
	close(w.release)
	select {
	case err := <-copied:
		if err != nil {
			t.Fatalf("COPY during the drain: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("COPY did not finish")
	}
	if got := hex.EncodeToString(w.h.Sum(nil)); got != want || w.n != size {
		t.Fatalf("COPY through the draining proxy: %d bytes sha256 %s; direct: %d bytes %s", w.n, got, size, want)
	}
	busy.Close(context.Background())
	time.Sleep(300 * time.Millisecond)
	if !p.alive() {
		t.Fatal("pgmfa exited while the idle session was still open")
	}
	idle.Close(context.Background())
	select {
	case <-p.exited:
	case <-time.After(20 * time.Second):
		t.Fatalf("pgmfa did not exit once its sessions ended\n%s", tail(p.logs.String(), 20))
	}
	if st := exitStatus(p.waitErr); st != 0 {
		t.Fatalf("exit status %d", st)
	}
	log := p.logs.String()
	if !strings.Contains(log, "drain finished") || !strings.Contains(log, "sessions_ended=2") || !strings.Contains(log, "sessions_cut=0") {
		t.Fatalf("the log does not say what was drained:\n%s", tail(log, 20))
	}
}

// TestDrainTimeout: with a short --drain-timeout, a login waiting for MFA
// approval is refused with 57P01 and a HINT, and the open sessions (an idle
// one, one running a query) are cut, their backends ended; the log counts
// and names them.
func TestDrainTimeout(t *testing.T) {
	pg := cluster(t)
	p := startServe(t, 0, "--drain-timeout", "3s", "--mfa-timeout", "120s")
	waiting := make(chan error, 1)
	go func() {
		// alice's first login, with no code: it waits for pgmfa approve.
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, pgcluster.DSN(p.host, p.port, alice, alicePW, "app"))
		if err == nil {
			c.Close(ctx)
		}
		waiting <- err
	}()
	if !eventually(20*time.Second, func() bool { return strings.Contains(p.logs.String(), "login waiting for MFA approval") }) {
		t.Fatal("the login never waited for approval")
	}
	idle := p.connectSvc(t)
	idlePID := backendPID(t, idle)
	sleeping := make(chan error, 1)
	go func() {
		cmd := exec.Command("psql", "-X", "-h", p.host, "-p", strconv.Itoa(p.port), "-U", svc, "-d", "app", "-c", "select pg_sleep(120)")
		cmd.Env = append(cmd.Environ(), "PGPASSWORD="+svcPW, "PGSSLMODE=disable", "PGOPTIONS=")
		sleeping <- cmd.Run()
	}()
	var sleeper string
	if !eventually(20*time.Second, func() bool {
		sleeper, _ = pg.Psql("select pid from pg_stat_activity where state = 'active' and query = 'select pg_sleep(120)'")
		return sleeper != ""
	}) {
		t.Fatal("the busy session's query never started")
	}

	t0 := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-waiting:
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "57P01" || !strings.Contains(pe.Hint, "--drain-timeout") {
			t.Fatalf("the waiting login got %v; want 57P01 with a HINT naming --drain-timeout", err)
		}
		if time.Since(t0) < 2*time.Second {
			t.Fatalf("the waiting login was refused after %v, before the drain timeout", time.Since(t0))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the waiting login was not refused")
	}
	select {
	case err := <-sleeping:
		if err == nil {
			t.Fatal("the busy session's query succeeded")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the busy session was not cut")
	}
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("pgmfa did not exit after the drain timeout")
	}
	var one int
	if err := idle.QueryRow(context.Background(), "select 1").Scan(&one); err == nil {
		t.Fatal("the idle session still works after the cut")
	}
	backendGone(t, pg, sleeper)
	backendGone(t, pg, strconv.Itoa(idlePID))
	log := p.logs.String()
	for _, s := range []string{"sessions_cut=2", "logins_refused=1", "drain timeout: session cut", `reason="drain timeout"`} {
		if !strings.Contains(log, s) {
			t.Fatalf("the log does not say %q:\n%s", s, tail(log, 30))
		}
	}
}

// TestSIGINTImmediate: SIGINT stops at once, an open session or not,
// whatever --drain-timeout says.
func TestSIGINTImmediate(t *testing.T) {
	p := startServe(t, 0, "--drain-timeout", "120s")
	c := p.connectSvc(t)
	if err := p.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("pgmfa did not exit at once on SIGINT")
	}
	var one int
	if err := c.QueryRow(context.Background(), "select 1").Scan(&one); err == nil {
		t.Fatal("the session survived SIGINT")
	}
	if strings.Contains(p.logs.String(), "draining") {
		t.Fatal("SIGINT drained")
	}
}
