package loop_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/pquerna/otp/totp"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/mfa"
)

// The tests in this file's siblings that need a whole process (its open-file
// limit, its RSS, its exit status) run `pgmfa serve` built from cmd/pgmfa
// in front of the shared cluster.

var (
	pgmfaBinOnce sync.Once
	pgmfaBin     string
	pgmfaBinErr  error
)

// buildPgmfa builds cmd/pgmfa once per test binary, into a directory
// TestMain removes.
func buildPgmfa(t *testing.T) string {
	t.Helper()
	pgmfaBinOnce.Do(func() {
		_, here, _, _ := runtime.Caller(0)
		root := filepath.Dir(filepath.Dir(here))
		dir, err := os.MkdirTemp("", "pgmfa-test-bin-")
		if err != nil {
			pgmfaBinErr = err
			return
		}
		pgmfaBin = filepath.Join(dir, "pgmfa")
		cmd := exec.Command("go", "build", "-o", pgmfaBin, "./cmd/pgmfa")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			pgmfaBinErr = fmt.Errorf("go build ./cmd/pgmfa: %v\n%s", err, out)
		}
	})
	if pgmfaBinErr != nil {
		t.Fatal(pgmfaBinErr)
	}
	return pgmfaBin
}

// serveProc is a `pgmfa serve` process under test.
type serveProc struct {
	t       *testing.T
	cmd     *exec.Cmd
	pg      *pgcluster.Cluster
	host    string
	port    int
	secrets map[string]string
	logs    *syncBuffer
	exited  chan struct{}
	waitErr error
}

// startServe runs `pgmfa serve` in front of the shared cluster with alice
// enrolled (and remembered after her first login) and svc exempt. nofile > 0 runs it under that open-file limit
// (soft and hard, through prlimit(1)).
func startServe(t *testing.T, nofile int, extra ...string) *serveProc {
	t.Helper()
	pg := cluster(t)
	bin := buildPgmfa(t)
	dir := t.TempDir()
	storePath := filepath.Join(dir, "totp.json")
	store, err := mfa.OpenFileStore(storePath)
	if err != nil {
		t.Fatal(err)
	}
	key, err := store.Enroll(alice, mfa.EnrollOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	port, err := pgcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	p := &serveProc{t: t, pg: pg, host: "127.0.0.1", port: port, secrets: map[string]string{alice: key.Secret()},
		logs: &syncBuffer{}, exited: make(chan struct{})}
	args := []string{"serve", "--listen", net.JoinHostPort(p.host, strconv.Itoa(port)), "--upstream", pg.Addr(),
		"--store", storePath, "--admin", "", "--mfa-exempt", svc, "--loops", "2",
		// Codes are single use: later logins of a test pass as remembered.
		"--mfa-remember", "1h"}
	args = append(args, extra...)
	var cmd *exec.Cmd
	if nofile > 0 {
		if _, err := exec.LookPath("prlimit"); err != nil {
			t.Skip("prlimit(1) not found (util-linux)")
		}
		n := strconv.Itoa(nofile)
		cmd = exec.Command("prlimit", append([]string{"--nofile=" + n + ":" + n, "--", bin}, args...)...)
	} else {
		cmd = exec.Command(bin, args...)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = cmd
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	listening := make(chan struct{})
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		once := sync.Once{}
		for sc.Scan() {
			line := sc.Text()
			_, _ = p.logs.Write([]byte(line + "\n"))
			if strings.Contains(line, "pgmfa listening") {
				once.Do(func() { close(listening) })
			}
		}
	}()
	go func() {
		// Wait closes the pipe: the log is read to its end first (EOF
		// comes when the process exits), so no last line is lost.
		<-scanned
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = cmd.Process.Signal(syscall.SIGINT)
			select {
			case <-p.exited:
			case <-time.After(15 * time.Second):
				_ = cmd.Process.Kill()
				<-p.exited
			}
		}
		if t.Failed() || testing.Verbose() {
			t.Logf("pgmfa serve log (tail):\n%s", tail(p.logs.String(), 60))
		}
	})
	select {
	case <-listening:
	case <-p.exited:
		t.Fatalf("pgmfa serve exited at start: %v\n%s", p.waitErr, p.logs.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("pgmfa serve did not start\n%s", p.logs.String())
	}
	// "listening" is logged when the engine boots; wait until it answers.
	if !eventually(10*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", p.addr(), time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}) {
		t.Fatalf("pgmfa serve does not accept connections\n%s", p.logs.String())
	}
	return p
}

func (p *serveProc) addr() string { return net.JoinHostPort(p.host, strconv.Itoa(p.port)) }

func (p *serveProc) pid() int { return p.cmd.Process.Pid }

// alive reports whether the process is still running.
func (p *serveProc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// login logs alice in with a current code and runs a query; it returns the
// error (a *pgconn.PgError when the proxy refused).
func (p *serveProc) login(timeout time.Duration) error {
	code, err := totp.GenerateCode(p.secrets[alice], time.Now())
	if err != nil {
		return err
	}
	dsn := pgcluster.DSN(p.host, p.port, alice, alicePW, "app") + "&options=" + strings.ReplaceAll(url.QueryEscape("-c pgmfa.code="+code), "+", "%20")
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var one int
	return conn.QueryRow(ctx, "select 1").Scan(&one)
}

// stop sends SIGTERM and returns the exit status (-1: killed).
func (p *serveProc) stop() int {
	p.t.Helper()
	select {
	case <-p.exited:
	default:
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(20 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	}
	return exitStatus(p.waitErr)
}

func exitStatus(err error) int {
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// rssKiB reads VmRSS of a process.
func rssKiB(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read /proc/%d/status: %v", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// isTooMany reports whether err is the proxy's (or a server's) 53300.
func isTooMany(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "53300"
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}
