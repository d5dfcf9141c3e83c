package main

import (
	"bufio"
	"context"
	"errors"
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
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/mfa/pgstore"
)

// The fleet tests run two `pgmfa serve` processes (this package's binary)
// in front of one database, sharing one PostgreSQL store kept in a second
// cluster (so the store can be stopped while the database keeps running).

const fleetPW = "pw"

type fleet struct {
	t        *testing.T
	db       *pgcluster.Cluster // the database users log in to
	st       *pgcluster.Cluster // the store
	storeDSN string             // as the proxies' least-privilege role
	ownerDSN string
	keyFile  string
	bin      string
	procs    []*fleetProc
}

type fleetProc struct {
	port  int
	admin string
	mu    sync.Mutex
	logs  strings.Builder
	cmd   *exec.Cmd
	done  chan struct{}
}

func (p *fleetProc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "pgmfa")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func startFleet(t *testing.T, users []string, serveFlags ...string) *fleet {
	t.Helper()
	var us []pgcluster.User
	for _, u := range users {
		us = append(us, pgcluster.User{Name: u, Password: fleetPW})
	}
	f := &fleet{t: t, bin: buildBinary(t)}
	f.db = pgtest.Start(t, pgcluster.Options{Users: us, Databases: []string{"app"}})
	f.st = pgtest.Start(t, pgcluster.Options{Users: []pgcluster.User{{Name: "pgmfa_proxy", Password: "proxy"}}})
	f.ownerDSN = f.st.DSN(pgcluster.Superuser, "postgres", "postgres")
	f.storeDSN = f.st.DSN("pgmfa_proxy", "proxy", "postgres")
	f.keyFile = filepath.Join(t.TempDir(), "store.key")
	f.pgmfa("store", "new-key", "--store-key-file", f.keyFile)
	f.pgmfa("store", "init", "--store", f.ownerDSN, "--grant", "pgmfa_proxy")
	for _, u := range users {
		f.pgmfa("enroll", "--store", f.ownerDSN, "--store-key-file", f.keyFile, "--qr=false", u)
	}
	for i := 0; i < 2; i++ {
		f.procs = append(f.procs, f.serve(0, serveFlags...))
	}
	return f
}

// pgmfa runs a subcommand of the binary and returns its stdout.
func (f *fleet) pgmfa(args ...string) string {
	f.t.Helper()
	out, err := f.run(args...)
	if err != nil {
		f.t.Fatalf("pgmfa %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (f *fleet) run(args ...string) (string, error) {
	cmd := exec.Command(f.bin, args...)
	cmd.Env = append(os.Environ(), "PGMFA_STORE=", "PGMFA_STORE_KEY_FILE=", "PGMFA_STORE_KEY=")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (f *fleet) serve(port int, extra ...string) *fleetProc {
	t := f.t
	if port == 0 {
		var err error
		if port, err = pgcluster.FreePort(); err != nil {
			t.Fatal(err)
		}
	}
	p := &fleetProc{port: port, admin: filepath.Join(t.TempDir(), "admin.sock"), done: make(chan struct{})}
	args := append([]string{"serve", "--listen", "127.0.0.1:" + strconv.Itoa(port), "--upstream", f.db.Addr(),
		"--store", f.storeDSN, "--store-key-file", f.keyFile, "--admin", p.admin, "--loops", "1"}, extra...)
	p.cmd = exec.Command(f.bin, args...)
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.mu.Lock()
			p.logs.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
		}
	}()
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("pgmfa serve :%d log:\n%s", p.port, p.log())
		}
	})
	if !eventually(30*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
		if err == nil {
			c.Close()
		}
		_, statErr := os.Stat(p.admin)
		return err == nil && statErr == nil
	}) {
		t.Fatalf("pgmfa serve did not start:\n%s", p.log())
	}
	return p
}

func eventually(d time.Duration, f func() bool) bool {
	end := time.Now().Add(d)
	for {
		if f() {
			return true
		}
		if time.Now().After(end) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// code is user's current code, read from the store as the proxies read it.
func (f *fleet) code(user string) string {
	f.t.Helper()
	keys, err := mfa.LoadKeyring(f.keyFile)
	if err != nil {
		f.t.Fatal(err)
	}
	s, err := pgstore.Open(f.ownerDSN, pgstore.Options{Keys: keys})
	if err != nil {
		f.t.Fatal(err)
	}
	defer s.Close()
	c, err := s.Code(user, time.Now())
	if err != nil {
		f.t.Fatal(err)
	}
	return c
}

// connect logs user in through instance i from source address from
// (127.0.0.x: loopback has all of 127/8), with code ("" for none).
func (f *fleet) connect(ctx context.Context, i int, user, code, from string) (*pgx.Conn, error) {
	dsn := pgcluster.DSN("127.0.0.1", f.procs[i].port, user, fleetPW, "app")
	if code != "" {
		dsn += "&options=" + strings.ReplaceAll(url.QueryEscape("-c pgmfa.code="+code), "+", "%20")
	}
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	if from != "" {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
		cfg.DialFunc = d.DialContext
	}
	return pgx.ConnectConfig(ctx, cfg)
}

func (f *fleet) login(i int, user, code, from string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := f.connect(ctx, i, user, code, from)
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	var one int
	return c.QueryRow(ctx, "SELECT 1").Scan(&one)
}

func mfaRefusal(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == mfa.SQLState {
		return pe.Message + " HINT: " + pe.Hint
	}
	return ""
}

// TestFleet is the fleet's guarantees with two real `pgmfa serve`
// processes sharing one PostgreSQL store: single use, remember grants,
// throttling, approvals across instances, and a store outage.
func TestFleet(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two PostgreSQL clusters and two proxies")
	}
	f := startFleet(t, []string{"alice", "bob", "carol", "dave", "erin", "frank"},
		"--mfa-remember", "1h", "--mfa-max-failures", "3", "--mfa-timeout", "60s",
		// Long enough that a store call blocked on a row lock (below) stays
		// blocked until the test lets it go; an unreachable store still
		// fails at once (connection refused).
		"--store-timeout", "2m")

	t.Run("single use: 50 logins with one code over two instances, one admitted", func(t *testing.T) {
		code := f.code("alice")
		var ok, refused atomic.Int32
		var wg sync.WaitGroup
		for i := 0; i < 50; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// Each from its own address: the remember rule (same code,
				// same address) does not apply, so all but one are replays.
				err := f.login(i%2, "alice", code, fmt.Sprintf("127.0.1.%d", 10+i))
				switch {
				case err == nil:
					ok.Add(1)
				case strings.Contains(mfaRefusal(err), "already used"):
					refused.Add(1)
				default:
					t.Errorf("login %d: %v", i, err)
				}
			}()
		}
		wg.Wait()
		if ok.Load() != 1 || refused.Load() != 49 {
			t.Fatalf("%d admitted, %d refused as replays; want 1 and 49", ok.Load(), refused.Load())
		}
	})

	t.Run("remember grants are the fleet's", func(t *testing.T) {
		code := f.code("bob")
		// A pool on one host: the same code from the same address over both
		// instances passes (the --mfa-remember rule), all at once.
		var wg sync.WaitGroup
		for i := 0; i < 10; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := f.login(i%2, "bob", code, "127.0.2.1"); err != nil {
					t.Errorf("pool login %d: %v", i, err)
				}
			}()
		}
		wg.Wait()
		// Later logins without a code pass on both instances from that
		// address, and on neither from another.
		for i := 0; i < 2; i++ {
			if err := f.login(i, "bob", "", "127.0.2.1"); err != nil {
				t.Fatalf("remembered login on instance %d: %v", i, err)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if c, err := f.connect(ctx, 1, "bob", "", "127.0.2.2"); err == nil {
			c.Close(context.Background())
			t.Fatal("another address was let in without a code")
		}
	})

	t.Run("throttling counts failures across the fleet", func(t *testing.T) {
		good := f.code("carol")
		bad := "000000"
		if bad == good {
			bad = "111111"
		}
		for i, inst := range []int{0, 0, 1} {
			err := f.login(inst, "carol", bad, fmt.Sprintf("127.0.3.%d", i+1))
			if !strings.Contains(mfaRefusal(err), "not valid") {
				t.Fatalf("failure %d: %v", i, err)
			}
		}
		for inst := 0; inst < 2; inst++ {
			err := f.login(inst, "carol", good, "127.0.3.9")
			if !strings.Contains(mfaRefusal(err), "too many failed MFA attempts") {
				t.Fatalf("instance %d after 3 failures over the fleet: %v", inst, err)
			}
		}
	})

	t.Run("approve on one instance releases a login waiting on the other", func(t *testing.T) {
		errc := make(chan error, 1)
		go func() { errc <- f.login(1, "dave", "", "127.0.4.1") }()
		var list string
		if !eventually(20*time.Second, func() bool {
			list, _ = f.run("approve", "--list", "--admin", f.procs[0].admin)
			return strings.Contains(list, "dave")
		}) {
			t.Fatalf("instance 0's --list does not show the login waiting on instance 1:\n%s", list)
		}
		start := time.Now()
		if out, err := f.run("approve", "--admin", f.procs[0].admin, "dave", f.code("dave")); err != nil {
			t.Fatalf("approve: %v\n%s", err, out)
		}
		// Released only by the store's notification: nothing polls.
		if err := <-errc; err != nil {
			t.Fatalf("the approved login: %v", err)
		}
		t.Logf("released %v after the approval returned", time.Since(start).Round(time.Millisecond))
		if list, _ := f.run("approve", "--list", "--admin", f.procs[1].admin); strings.Contains(list, "dave") {
			t.Fatalf("the released login is still listed:\n%s", list)
		}
	})

	t.Run("--reuse-port: two processes on one address share the logins", func(t *testing.T) {
		port, err := pgcluster.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		a := f.serve(port, "--reuse-port", "--mfa-remember", "1h")
		b := f.serve(port, "--reuse-port", "--mfa-remember", "1h")
		// Bob is remembered from 127.0.2.1 (above): no code needed, from
		// either process. The kernel picks the process by a hash of the
		// connection's addresses and ports: 30 logins all landing on one
		// of two processes has a chance of 2^-29.
		dsn := pgcluster.DSN("127.0.0.1", port, "bob", fleetPW, "app")
		var wg sync.WaitGroup
		for w := 0; w < 6; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 5; i++ {
					cfg, err := pgx.ParseConfig(dsn)
					if err != nil {
						t.Error(err)
						return
					}
					d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.2.1")}}
					cfg.DialFunc = d.DialContext
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					c, err := pgx.ConnectConfig(ctx, cfg)
					cancel()
					if err != nil {
						t.Errorf("login: %v", err)
						return
					}
					c.Close(context.Background())
				}
			}()
		}
		wg.Wait()
		if t.Failed() {
			return
		}
		na, nb := strings.Count(a.log(), "user=bob"), strings.Count(b.log(), "user=bob")
		if na == 0 || nb == 0 {
			t.Fatalf("logins seen by the two processes: %d and %d; want both used", na, nb)
		}
		// Without the flag the address is refused, naming the problem.
		out, err := f.run("serve", "--listen", "127.0.0.1:"+strconv.Itoa(port), "--upstream", f.db.Addr(),
			"--store", f.storeDSN, "--store-key-file", f.keyFile, "--admin", "")
		if err == nil || !strings.Contains(out, "address already in use") {
			t.Fatalf("a third process without --reuse-port: %v\n%s", err, out)
		}
	})

	t.Run("store calls that hang delay only their own logins, not the event loop", func(t *testing.T) {
		ctx := context.Background()
		owner, err := pgx.Connect(ctx, f.ownerDSN)
		if err != nil {
			t.Fatal(err)
		}
		defer owner.Close(ctx)
		tx, err := owner.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(ctx)
		// The remember grants locked: every MFA decision with
		// --mfa-remember reads them, so frank's code and bob's remembered
		// login both wait for the lock.
		if _, err := tx.Exec(ctx, `LOCK TABLE pgmfa.grants IN ACCESS EXCLUSIVE MODE`); err != nil {
			t.Fatal(err)
		}
		// Watched from a second session, outside the lock's transaction:
		// PostgreSQL documents that a transaction collects the current
		// queries of all sessions at its first look and shows the same
		// throughout, so waits that begin later may never show in it.
		watch, err := pgx.Connect(ctx, f.ownerDSN)
		if err != nil {
			t.Fatal(err)
		}
		defer watch.Close(ctx)
		code := f.code("frank")
		type result struct {
			who string
			err error
		}
		results := make(chan result, 2)
		go func() { results <- result{"frank (a code)", f.login(0, "frank", code, "127.0.6.1")} }()
		go func() { results <- result{"bob (remembered)", f.login(0, "bob", "", "127.0.2.1")} }()
		if !eventually(20*time.Second, func() bool {
			var n int
			_ = watch.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgmfa' AND wait_event_type = 'Lock'`).Scan(&n)
			return n >= 2
		}) {
			var sessions []string
			rows, _ := watch.Query(ctx, `SELECT format('pid=%s state=%s wait=%s/%s query=%s', pid, state, wait_event_type, wait_event, left(query, 100))
				FROM pg_stat_activity WHERE application_name = 'pgmfa'`)
			for rows.Next() {
				var line string
				_ = rows.Scan(&line)
				sessions = append(sessions, line)
			}
			var ended []string
			for len(results) > 0 {
				r := <-results
				ended = append(ended, fmt.Sprintf("%s: %v", r.who, r.err))
			}
			// The whole log is printed at the end, where a long CI output
			// may be cut: these two users' lines are repeated here.
			var lines []string
			for _, l := range strings.Split(f.procs[0].log(), "\n") {
				if strings.Contains(l, "user=bob") || strings.Contains(l, "user=frank") {
					lines = append(lines, l)
				}
			}
			lines = lines[max(len(lines)-6, 0):]
			t.Fatalf("the two logins' store calls never both waited for the lock\nstore sessions:\n%s\nlogins already ended: %q\ninstance 0's last lines of bob and frank:\n%s",
				strings.Join(sessions, "\n"), ended, strings.Join(lines, "\n"))
		}
		// Instance 0 runs one event loop: had either store call run on
		// it, this login could not even be told its password is wrong
		// until the lock is gone (the store's deadline is 2 minutes, the
		// login's 30 s).
		var pe *pgconn.PgError
		ctx30, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		cfg, _ := pgx.ParseConfig(pgcluster.DSN("127.0.0.1", f.procs[0].port, "carol", "wrong", "app"))
		_, err = pgx.ConnectConfig(ctx30, cfg)
		if !errors.As(err, &pe) || pe.Code != "28P01" {
			t.Fatalf("a wrong password while store calls hang: %v", err)
		}
		select {
		case r := <-results:
			t.Fatalf("a login ended while its store call was blocked: %s: %v", r.who, r.err)
		default:
		}
		if err := tx.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 2; i++ {
			if r := <-results; r.err != nil {
				t.Fatalf("a login after the lock was released: %s: %v", r.who, r.err)
			}
		}
	})

	t.Run("a store that is unreachable or not initialised stops serve at start, saying so", func(t *testing.T) {
		port, err := pgcluster.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		for store, want := range map[string]string{
			"postgres://pgmfa_proxy@127.0.0.1:1/postgres?sslmode=disable": "connect",
			f.st.DSN(pgcluster.Superuser, "postgres", "template1"):        "pgmfa store init",
			"postgres://pgmfa_proxy@127.0.0.1:notaport/postgres":          "not a valid PostgreSQL connection string",
		} {
			out, err := f.run("serve", "--listen", "127.0.0.1:"+strconv.Itoa(port), "--upstream", f.db.Addr(),
				"--store", store, "--store-key-file", f.keyFile, "--admin", "")
			if err == nil || !strings.Contains(out, "cannot start") || !strings.Contains(out, want) {
				t.Errorf("serve --store %s: %v\n%s", store, err, out)
			}
		}
	})

	t.Run("store outage: logins refused with a hint, sessions untouched, recovery on its own", func(t *testing.T) {
		ctx := context.Background()
		session, err := f.connect(ctx, 0, "erin", f.code("erin"), "127.0.5.1")
		if err != nil {
			t.Fatal(err)
		}
		defer session.Close(ctx)
		code := f.code("alice") // read before the store goes away
		pgCtl(t, f.st, "stop", "-m", "fast")
		err = f.login(1, "alice", code, "127.0.5.2")
		if msg := mfaRefusal(err); !strings.Contains(msg, "cannot reach its MFA store") || !strings.Contains(msg, "HINT: try again") {
			t.Fatalf("login during the outage: %v", err)
		}
		var n int
		if err := session.QueryRow(ctx, "SELECT 41 + 1").Scan(&n); err != nil || n != 42 {
			t.Fatalf("a session opened before the outage: %v %d", err, n)
		}
		pgCtl(t, f.st, "start", "-l", f.st.LogFile, "-o", "-p "+strconv.Itoa(f.st.Port))
		var last error
		if !eventually(60*time.Second, func() bool {
			last = f.login(1, "bob", "", "127.0.2.1") // remembered: no code needed
			return last == nil
		}) {
			t.Fatalf("logins do not pass after the store is back: %v", last)
		}
		if err := session.QueryRow(ctx, "SELECT 1").Scan(&n); err != nil {
			t.Fatalf("the session after the outage: %v", err)
		}
	})
}

// pgCtl runs pg_ctl on a cluster as the user that owns it.
func pgCtl(t *testing.T, c *pgcluster.Cluster, args ...string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(c.BinDir, "pg_ctl"), append([]string{"-D", c.DataDir, "-w", "-t", "60"}, args...)...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C", "TZ=UTC"}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatal(err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
		cmd.Dir = os.TempDir()
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pg_ctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}
