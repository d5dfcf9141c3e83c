package loop_test

// Flow control, end to end (issue 9, requirement 1): every workload that
// works on a direct connection works through a proxy started with default
// flags, spliced (--splice sockmap, no --max-backlog), over a TCP and a
// unix-socket upstream, and loads or reads exactly what the same workload
// does directly. The bad-input cases (a client that half-closes, a client
// that resets, a database that is killed) end their session cleanly, with
// a session-end line, and leave no spliced session, BPF map entry, fd,
// goroutine or heap behind.
//
// Sizes are CI sizes (a few hundred MB, pauses of seconds) unless
// PGMFA_SOAK=1 (see soak). Speed is never asserted: the throttles and
// pauses only make a reader or the database fall behind its sender.

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/mfa"
)

// soak reports whether the flow-control workloads run at full size. With
// PGMFA_SOAK=1 they use the sizes issue 9 names: a COPY FROM of ≥ 1 GB
// (psql \copy and pgx CopyFrom), a pg_restore of a ~400 MB dump, a 500 MB
// result read at 2 MB/s, a reader that stops for 60 s, a trigger that
// stalls the database for 20 s. Unset (make test, CI), they use ~200–250 MB
// and pauses of a few seconds, so the whole file runs in a few minutes on
// 2 cores. Run a soak with, for example:
//
//	PGMFA_SOAK=1 go test -count=1 -timeout 60m -run TestFlow ./loop/ -v
func soak() bool { return os.Getenv("PGMFA_SOAK") == "1" }

// sized is ci, or full under PGMFA_SOAK=1.
func sized[T any](ci, full T) T {
	if soak() {
		return full
	}
	return ci
}

// fcConfig is the handoff the flow-control tests run through. Unset, it is
// the product's default: --splice sockmap and no --max-backlog, which is
// what these tests are about. PGMFA_FC_HARNESS checks the harness itself
// against paths that do not end sessions: "relay" (--splice off) and
// "nobound" (sockmap with a 4 GiB bound). Those runs must pass except for
// the flow_control assertion (assertFlowControl).
//
// mode is the handoff the session-end lines must name.
func fcConfig(t *testing.T) (mode string, mod func(*loop.Config)) {
	t.Helper()
	switch h := os.Getenv("PGMFA_FC_HARNESS"); h {
	case "relay":
		return "relay", func(c *loop.Config) { c.Splice = loop.SpliceOff }
	case "", "nobound":
		if err := bpf.Probe(); err != nil {
			pgtest.SkipOrFail(t, "sockmap splicing unavailable: %v", err)
		}
		return "sockmap", func(c *loop.Config) {
			c.Splice = loop.SpliceSockmap
			if h == "nobound" {
				c.MaxBacklog = 1 << 32
			}
		}
	default:
		t.Fatalf("PGMFA_FC_HARNESS=%q: want relay, nobound or unset", h)
		return "", nil
	}
}

// fcUpstream is an address of a cluster the proxy dials: TCP or its unix
// socket (which the sockmap splices too).
type fcUpstream struct{ name, addr string }

func fcUpstreams(pg *pgcluster.Cluster) []fcUpstream {
	return []fcUpstream{{"tcp", pg.Addr()}, {"unix", pg.SocketPath()}}
}

// fcProxy is a proxy with default flags in front of one upstream, with
// what it held before the workload (to prove nothing leaked after it).
type fcProxy struct {
	*proxy
	mode       string // in the session-end lines: sockmap or relay
	fds        int
	goroutines int
	heap       uint64
}

// startFCProxy starts a proxy (alice's code is remembered, so the clients
// of one test can log in many times), makes one spliced session to warm up
// pools and buffers, and records the baseline.
func startFCProxy(t *testing.T, upstream string) *fcProxy {
	t.Helper()
	mode, mod := fcConfig(t)
	p := startProxy(t, mfa.Options{Remember: time.Hour}, func(c *loop.Config) {
		c.Upstream = upstream
		mod(c)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, p.dsn(alice, alicePW, "app", p.code(alice)))
	if err != nil {
		t.Fatalf("warm-up login: %v", err)
	}
	if _, err := conn.Exec(ctx, "select 1"); err != nil {
		t.Fatalf("warm-up query: %v", err)
	}
	conn.Close(ctx)
	if !eventually(10*time.Second, func() bool { return p.srv.StatsSnapshot()["active"] == 0 }) {
		t.Fatalf("the warm-up session did not end: %v", p.srv.StatsSnapshot())
	}
	if mode == "sockmap" && strings.HasPrefix(upstream, "/") {
		if err := bpf.ProbeUnixUpstreams(); err != nil {
			// A property of the kernel (see bpf.load): sessions to a
			// unix upstream are relayed, and must still be exact.
			t.Logf("unix upstreams are relayed here: %v", err)
			mode = "relay"
		}
	}
	fp := &fcProxy{proxy: p, mode: mode}
	fp.fds, fp.goroutines, fp.heap = openFDs(t), runtime.NumGoroutine(), heapAfterGC()
	return fp
}

// aliceDSN is a URL to the proxy for alice with her current code.
func (fp *fcProxy) aliceDSN(db string) string { return fp.dsn(alice, alicePW, db, fp.code(alice)) }

// finish waits until every session of the proxy has ended, checks that each
// was handed off the configured way (mode=sockmap: really spliced), checks
// for leaks and returns the end of the workload's session (the one that
// moved the most bytes).
func (fp *fcProxy) finish(t *testing.T) sessionEnd {
	t.Helper()
	if !eventually(30*time.Second, func() bool { return fp.srv.StatsSnapshot()["active"] == 0 }) {
		t.Fatalf("sessions still active: %v", fp.srv.StatsSnapshot())
	}
	ends := sessionEnds(fp.logs.String())
	if len(ends) < 2 { // the warm-up and the workload at least
		t.Fatalf("want a session-end line for every session, got %d", len(ends))
	}
	var big sessionEnd
	for _, e := range ends {
		if e["mode"] != fp.mode {
			t.Errorf("a session was not handed off as %s: %s", fp.mode, e["_line"])
		}
		if big == nil || e.moved() > big.moved() {
			big = e
		}
	}
	if st := fp.srv.StatsSnapshot(); fp.mode == "sockmap" && (st["spliced"] != int64(len(ends)) || st["relayed"] != 0) {
		t.Errorf("not every session was spliced: %v", st)
	}
	fp.checkLeaks(t)
	return big
}

// checkLeaks: no spliced session, BPF map entry, fd, goroutine or heap is
// left beyond the baseline taken after the warm-up.
func (fp *fcProxy) checkLeaks(t *testing.T) {
	t.Helper()
	var sessions, entries int
	var err error
	if !eventually(10*time.Second, func() bool {
		sessions, entries, err = fp.srv.SplicerState()
		return err == nil && sessions == 0 && entries == 0
	}) {
		t.Errorf("the splicer still holds %d session(s) and %d map entries (%v)", sessions, entries, err)
	}
	if !eventually(10*time.Second, func() bool { return openFDs(t) <= fp.fds }) {
		t.Errorf("fd leak: %d open after the warm-up, %d now", fp.fds, openFDs(t))
	}
	// Slack of 2: one goroutine above the baseline once failed this in CI
	// (16 → 17) after a clean psql session, cause not found; a leak per
	// session would show as far more than 2 over a test's sessions.
	if !eventually(10*time.Second, func() bool { return runtime.NumGoroutine() <= fp.goroutines+2 }) {
		t.Errorf("goroutine leak: %d after the warm-up, %d now", fp.goroutines, runtime.NumGoroutine())
	}
	// Generous: a session's buffers are KiB; a leak that matters here is
	// the megabytes a session held while its reader was behind.
	const slack = 32 << 20
	var heap uint64
	if !eventually(10*time.Second, func() bool { heap = heapAfterGC(); return heap <= fp.heap+slack }) {
		t.Errorf("heap after GC: %d MiB after the warm-up, %d MiB now", fp.heap>>20, heap>>20)
	}
}

func heapAfterGC() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// sessionEnd is one "session end" log line, field by field (and "_line",
// the line itself).
type sessionEnd map[string]string

func (e sessionEnd) num(k string) int64 {
	n, _ := strconv.ParseInt(e[k], 10, 64)
	return n
}

func (e sessionEnd) moved() int64 {
	return e.num("bytes_client_to_server") + e.num("bytes_server_to_client")
}

// sessionEnds parses the proxy's "session end" lines (slog text format).
func sessionEnds(log string) []sessionEnd {
	var ends []sessionEnd
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, `msg="session end"`) {
			e := parseLogLine(line)
			e["_line"] = line
			ends = append(ends, e)
		}
	}
	return ends
}

// parseLogLine splits a slog text line into key=value pairs; values may be
// Go-quoted.
func parseLogLine(line string) sessionEnd {
	e := sessionEnd{}
	s := line
	for {
		s = strings.TrimLeft(s, " ")
		eq := strings.IndexByte(s, '=')
		if eq <= 0 {
			return e
		}
		key := s[:eq]
		s = s[eq+1:]
		if strings.HasPrefix(s, `"`) {
			q, err := strconv.QuotedPrefix(s)
			if err != nil {
				return e
			}
			e[key], _ = strconv.Unquote(q)
			s = s[len(q):]
			continue
		}
		sp := strings.IndexByte(s, ' ')
		if sp < 0 {
			sp = len(s)
		}
		e[key], s = s[:sp], s[sp:]
	}
}

// assertCleanEnd: the session ended because a side closed it, not because
// the proxy gave up on it (a bound, an error, a reset).
func assertCleanEnd(t *testing.T, e sessionEnd) {
	t.Helper()
	switch e["reason"] {
	case "client closed", "server closed", "closed": // sockmap, sockmap, relay
	default:
		t.Errorf("the session was ended (reason %q): %s", e["reason"], e["_line"])
	}
}

// assertEndedWithReason: a session that a peer broke ends with a reason
// that is not one of the proxy's own limits.
func assertEndedWithReason(t *testing.T, e sessionEnd) {
	t.Helper()
	if r := e["reason"]; r == "" || r == bpf.ReasonBacklogLimit || r == "proxy shutdown" {
		t.Errorf("the session's end names no cause of its own (reason %q): %s", r, e["_line"])
	}
}

// assertFlowControl is the one place that says how a session-end line shows
// that a spliced session went through flow control: flow_control (how many
// times a direction entered it) is at least 1; relayed_bytes (bytes moved
// in user space) is logged. A relayed session (a unix upstream on a kernel
// without the sockmap iterator) has no kernel queue to control.
func assertFlowControl(t *testing.T, e sessionEnd) {
	t.Helper()
	if e["mode"] == "relay" && os.Getenv("PGMFA_FC_HARNESS") == "" {
		return
	}
	n, err := strconv.Atoi(e["flow_control"])
	if err != nil || n < 1 {
		t.Errorf("the session did not go through flow control (want flow_control>=1): %s", e["_line"])
		return
	}
	t.Logf("flow control: %d direction(s); %s bytes relayed in user space", n, e["relayed_bytes"])
}

// meteredConn is a client's socket that reads at most rate bytes per
// second (0: as fast as they come) and stops reading for pause once
// pauseAfter bytes were read, so that the client's TCP receive window
// really fills; it counts what it reads and writes.
type meteredConn struct {
	net.Conn
	rate       float64
	pauseAfter int64
	pause      time.Duration

	read, written atomic.Int64

	start  time.Time // of the first throttled read; only the reader touches it
	paused bool
}

func (c *meteredConn) Read(p []byte) (int, error) {
	if c.rate > 0 && len(p) > 32<<10 {
		p = p[:32<<10]
	}
	n, err := c.Conn.Read(p)
	total := c.read.Add(int64(n))
	if c.pause > 0 && !c.paused && total >= c.pauseAfter {
		c.paused = true
		time.Sleep(c.pause)
	}
	if c.rate > 0 {
		if c.start.IsZero() {
			c.start = time.Now()
		}
		time.Sleep(time.Until(c.start.Add(time.Duration(float64(total) / c.rate * float64(time.Second)))))
	}
	return n, err
}

func (c *meteredConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

// tcp is the client's TCP socket.
func (c *meteredConn) tcp() *net.TCPConn { return c.Conn.(*net.TCPConn) }

// meter dials the first connection of a client as a meteredConn (later
// dials, such as a cancel request, are plain).
type meter struct {
	rate       float64
	pauseAfter int64
	pause      time.Duration
	// conn is set by dial on pgx's goroutine and read by the test's
	// (go test -race found the plain pointer).
	conn atomic.Pointer[meteredConn]
}

func (m *meter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil || m.conn.Load() != nil {
		return c, err
	}
	mc := &meteredConn{Conn: c, rate: m.rate, pauseAfter: m.pauseAfter, pause: m.pause}
	m.conn.Store(mc)
	return mc, nil
}

// written is what the client has written so far.
func (m *meter) written() int64 {
	c := m.conn.Load()
	if c == nil {
		return 0
	}
	return c.written.Load()
}

func connectMetered(ctx context.Context, dsn string, m *meter) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	cfg.DialFunc = m.dial
	return pgconn.ConnectConfig(ctx, cfg)
}

// waitStalled waits until the client has written at least min bytes and
// then nothing for half a second (its bytes are held somewhere between it
// and the database), or until over is closed or limit passes.
func waitStalled(m *meter, min int64, over <-chan struct{}, limit time.Duration) {
	deadline := time.Now().Add(limit)
	last, since := int64(-1), time.Now()
	for time.Now().Before(deadline) {
		select {
		case <-over:
			return
		case <-time.After(50 * time.Millisecond):
		}
		w := m.written()
		if w != last {
			last, since = w, time.Now()
			continue
		}
		if w >= min && time.Since(since) > 500*time.Millisecond {
			return
		}
	}
}

// ---- uploads ------------------------------------------------------------

const uploadPad = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz"

// uploadPayload is row g's payload, in the file and in pgx's rows alike.
func uploadPayload(g int) string {
	return fmt.Sprintf("%x-%s", sha256.Sum256([]byte(strconv.Itoa(g))), uploadPad)
}

// writeUploadFile writes rows 1..n as COPY text (~250 bytes a row).
func writeUploadFile(t *testing.T, path string, n int) int64 {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	for g := 1; g <= n; g++ {
		fmt.Fprintf(w, "%d\t%s\n", g, uploadPayload(g))
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	st, _ := f.Stat()
	f.Close()
	return st.Size()
}

// createUploadTable makes an empty table for a load; stallAt > 0 adds a
// BEFORE INSERT trigger that sleeps stall on that row, so the database
// stops reading mid-COPY.
func createUploadTable(t *testing.T, pg *pgcluster.Cluster, table string, stallAt int, stall time.Duration) {
	t.Helper()
	sql := fmt.Sprintf("drop table if exists %[1]s; create unlogged table %[1]s (g int, payload text); grant all on %[1]s to public;", table)
	if stallAt > 0 {
		sql += fmt.Sprintf(`
			create or replace function fc_stall() returns trigger language plpgsql as
				$$ begin perform pg_sleep(tg_argv[0]::float8); return new; end $$;
			create trigger fc_stall before insert on %s for each row when (new.g = %d)
				execute function fc_stall('%f');`, table, stallAt, stall.Seconds())
	}
	if _, err := pg.PsqlDB("app", sql); err != nil {
		t.Fatal(err)
	}
}

// uploadSummary identifies a loaded table: rows, distinct keys, key sum and
// two content hashes (payloads, and payloads bound to their keys).
func uploadSummary(t *testing.T, pg *pgcluster.Cluster, table string) string {
	t.Helper()
	out, err := pg.PsqlDB("app", fmt.Sprintf(`select count(*) || ' ' || count(distinct g) || ' ' || coalesce(sum(g::bigint), 0)
		|| ' ' || coalesce(sum(hashtext(payload)::bigint), 0) || ' ' || coalesce(sum(hashtext(g || ':' || payload)::bigint), 0) from %s`, table))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

func dropTable(pg *pgcluster.Cluster, table string) { pg.PsqlDB("app", "drop table if exists "+table) }

// psqlCopyFrom runs psql \copy FROM file.
func psqlCopyFrom(host string, port int, user, pw, code, table, file string) error {
	ctx, cancel := context.WithTimeout(context.Background(), sized(5*time.Minute, 30*time.Minute))
	defer cancel()
	cmd := exec.CommandContext(ctx, "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", strconv.Itoa(port),
		"-U", user, "-d", "app", "-c", `\copy `+table+` from '`+file+`'`)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+pw, "PGSSLMODE=disable", "PGCONNECT_TIMEOUT=30", "PGOPTIONS=")
	if code != "" {
		cmd.Env = append(cmd.Env, "PGOPTIONS=-c pgmfa.code="+code)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("psql \\copy from: %v\n%s", err, out)
	}
	return nil
}

// pgxCopyFrom loads rows 1..n (the upload file's rows) with pgx CopyFrom
// over m's connection.
func pgxCopyFrom(ctx context.Context, dsn, table string, n int, m *meter) error {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return err
	}
	cfg.DialFunc = m.dial
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	g := 0
	rows, err := conn.CopyFrom(ctx, pgx.Identifier{table}, []string{"g", "payload"}, pgx.CopyFromFunc(func() ([]any, error) {
		if g == n {
			return nil, nil
		}
		g++
		return []any{int32(g), uploadPayload(g)}, nil
	}))
	if err == nil && rows != int64(n) {
		err = fmt.Errorf("CopyFrom reported %d rows, want %d", rows, n)
	}
	return err
}

// TestFlowUpload: COPY FROM through a default-flag spliced proxy, over a TCP
// and a unix-socket upstream — psql \copy of a file, pgx CopyFrom of the
// same rows, and psql \copy into a table whose BEFORE INSERT trigger stops
// the database for seconds on one row — loads exactly what a direct psql
// \copy of the file loads (rows, keys, content hashes), with no session
// ended, through flow control, and leaks nothing.
func TestFlowUpload(t *testing.T) {
	fcConfig(t) // skips early where the path is unavailable
	pg := cluster(t)
	rows := sized(1_000_000, 4_700_000) // ~230 MB; ~1.1 GB
	file := filepath.Join(t.TempDir(), "upload.tsv")
	size := writeUploadFile(t, file, rows)
	t.Logf("upload: %d rows, %d MB", rows, size>>20)

	createUploadTable(t, pg, "fc_up_direct", 0, 0)
	start := time.Now()
	if err := psqlCopyFrom(pg.Host, pg.Port, alice, alicePW, "", "fc_up_direct", file); err != nil {
		t.Fatalf("direct: %v", err)
	}
	want := uploadSummary(t, pg, "fc_up_direct")
	t.Logf("direct psql \\copy: %s in %v", want, time.Since(start).Round(time.Millisecond))
	dropTable(pg, "fc_up_direct")
	if !strings.HasPrefix(want, strconv.Itoa(rows)+" "+strconv.Itoa(rows)+" ") {
		t.Fatalf("direct \\copy loaded %q, want %d rows", want, rows)
	}
	// pgx's rows are the file's rows: its direct load must match too.
	createUploadTable(t, pg, "fc_up_direct", 0, 0)
	if err := pgxCopyFrom(context.Background(), pg.DSN(alice, alicePW, "app"), "fc_up_direct", rows, &meter{}); err != nil {
		t.Fatalf("direct pgx CopyFrom: %v", err)
	}
	if got := uploadSummary(t, pg, "fc_up_direct"); got != want {
		t.Fatalf("direct pgx CopyFrom loaded %q; direct \\copy %q", got, want)
	}
	dropTable(pg, "fc_up_direct")

	stall := sized(5*time.Second, 20*time.Second)
	for _, up := range fcUpstreams(pg) {
		t.Run("psql-copy/"+up.name, func(t *testing.T) {
			fp := startFCProxy(t, up.addr)
			table := "fc_up_psql_" + up.name
			createUploadTable(t, pg, table, 0, 0)
			defer dropTable(pg, table)
			if err := psqlCopyFrom(fp.host, fp.port, alice, alicePW, fp.code(alice), table, file); err != nil {
				t.Errorf("through the proxy: %v", err)
			}
			if got := uploadSummary(t, pg, table); got != want {
				t.Errorf("through the proxy loaded %q; direct %q", got, want)
			}
			end := fp.finish(t)
			assertCleanEnd(t, end)
			assertFlowControl(t, end)
		})
		t.Run("pgx-copyfrom/"+up.name, func(t *testing.T) {
			fp := startFCProxy(t, up.addr)
			table := "fc_up_pgx_" + up.name
			createUploadTable(t, pg, table, 0, 0)
			defer dropTable(pg, table)
			ctx, cancel := context.WithTimeout(context.Background(), sized(5*time.Minute, 30*time.Minute))
			defer cancel()
			if err := pgxCopyFrom(ctx, fp.aliceDSN("app"), table, rows, &meter{}); err != nil {
				t.Errorf("through the proxy: %v", err)
			}
			if got := uploadSummary(t, pg, table); got != want {
				t.Errorf("through the proxy loaded %q; direct %q", got, want)
			}
			end := fp.finish(t)
			assertCleanEnd(t, end)
			// Not assertFlowControl: pgx encodes rows in Go, and on two
			// cores it is often no faster than PostgreSQL ingests (the 1 GB
			// soak load never put the kernel's queue past the threshold);
			// the other uploads, which are, assert it.
			t.Logf("flow control: %s episode(s), %s bytes relayed", end["flow_control"], end["relayed_bytes"])
		})
		t.Run("database-stalls/"+up.name, func(t *testing.T) {
			fp := startFCProxy(t, up.addr)
			table := "fc_up_stall_" + up.name
			createUploadTable(t, pg, table, rows/10, stall)
			defer dropTable(pg, table)
			if err := psqlCopyFrom(fp.host, fp.port, alice, alicePW, fp.code(alice), table, file); err != nil {
				t.Errorf("through the proxy: %v", err)
			}
			if got := uploadSummary(t, pg, table); got != want {
				t.Errorf("through the proxy loaded %q; direct (no trigger) %q", got, want)
			}
			end := fp.finish(t)
			assertCleanEnd(t, end)
			assertFlowControl(t, end)
		})
	}
}

// ---- pg_restore -------------------------------------------------------------

var (
	restoreOnce sync.Once
	restoreDump string
	restoreWant string
	restoreErr  error
)

// restoreSummary identifies a restored database: rows and a hash of every
// row of each table, the indexes, the sequence.
func restoreSummary(pg *pgcluster.Cluster, db string) (string, error) {
	out, err := pg.PsqlDB(db, `select string_agg(x, ' ' order by x) from (
		select 'items:' || count(*) || ':' || sum(hashtext(t::text)::bigint) from items t
		union all select 'notes:' || count(*) || ':' || sum(hashtext(t::text)::bigint) from notes t
		union all select 'indexes:' || string_agg(indexname, ',' order by indexname) from pg_indexes where schemaname = 'public'
		union all select 'seq:' || last_value from notes_id_seq) s(x)`)
	return strings.TrimSpace(out), err
}

// restoreSource builds a database of a few hundred MB once and dumps it
// (custom format, uncompressed, so the restore moves every byte).
func restoreSource(t *testing.T, pg *pgcluster.Cluster) (dump, want string) {
	t.Helper()
	restoreOnce.Do(func() {
		n := sized(800_000, 1_600_000) // ~200 MB; ~400 MB
		dir, err := os.MkdirTemp("", "pgmfa-fc-dump-")
		if err != nil {
			restoreErr = err
			return
		}
		os.Chmod(dir, 0o755)
		if _, err := pg.Psql("drop database if exists fcsrc; create database fcsrc"); err != nil {
			restoreErr = err
			return
		}
		if _, err := pg.PsqlDB("fcsrc", fmt.Sprintf(`
			create table items (g int primary key, h text not null, pad text, blob bytea);
			insert into items select g, md5(g::text), repeat(chr(65 + g %% 26), 150),
				decode(md5(g::text) || md5((-g)::text), 'hex') from generate_series(1, %d) g;
			create index items_h on items (h);
			create table notes (id serial primary key, body text);
			insert into notes (body) select 'note ' || g from generate_series(1, 1000) g;`, n)); err != nil {
			restoreErr = err
			return
		}
		if restoreWant, restoreErr = restoreSummary(pg, "fcsrc"); restoreErr != nil {
			return
		}
		restoreDump = filepath.Join(dir, "fcsrc.dump")
		cmd := exec.Command(filepath.Join(pg.BinDir, "pg_dump"), "-Fc", "-Z0", "-h", pg.SocketDir, "-p", strconv.Itoa(pg.Port),
			"-U", pgcluster.Superuser, "-f", restoreDump, "fcsrc")
		cmd.Env = append(os.Environ(), "PGOPTIONS=")
		if out, err := cmd.CombinedOutput(); err != nil {
			restoreErr = fmt.Errorf("pg_dump: %v\n%s", err, out)
		}
		pg.Psql("drop database fcsrc")
	})
	if restoreErr != nil {
		t.Fatalf("restore source: %v", restoreErr)
	}
	return restoreDump, restoreWant
}

// TestFlowRestore: pg_restore of an uncompressed custom-format dump of a
// few hundred MB through a default-flag spliced proxy, over a TCP and a
// unix-socket upstream, restores exactly the dumped database (rows and row
// hashes per table, indexes, sequence) with no session ended, and leaks
// nothing. The dumped database is the direct reference.
func TestFlowRestore(t *testing.T) {
	fcConfig(t) // skips early where the path is unavailable
	pg := cluster(t)
	dump, want := restoreSource(t, pg)
	if st, err := os.Stat(dump); err == nil {
		t.Logf("dump: %d MB; source: %s", st.Size()>>20, want)
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Dir(dump)) })
	for _, up := range fcUpstreams(pg) {
		t.Run(up.name, func(t *testing.T) {
			fp := startFCProxy(t, up.addr)
			db := "fcrestore_" + up.name
			if _, err := pg.Psql(fmt.Sprintf("drop database if exists %[1]s; create database %[1]s", db)); err != nil {
				t.Fatal(err)
			}
			defer pg.Psql(fmt.Sprintf("drop database if exists %s with (force)", db))
			ctx, cancel := context.WithTimeout(context.Background(), sized(5*time.Minute, 30*time.Minute))
			defer cancel()
			cmd := exec.CommandContext(ctx, filepath.Join(pg.BinDir, "pg_restore"), "-e", "--no-owner", "--no-privileges",
				"-h", fp.host, "-p", strconv.Itoa(fp.port), "-U", alice, "-d", db, dump)
			cmd.Env = append(os.Environ(), "PGPASSWORD="+alicePW, "PGSSLMODE=disable", "PGCONNECT_TIMEOUT=30",
				"PGOPTIONS=-c pgmfa.code="+fp.code(alice))
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("pg_restore through the proxy: %v\n%s", err, out)
			}
			if got, err := restoreSummary(pg, db); err != nil || got != want {
				t.Errorf("restored %q (%v); dumped %q", got, err, want)
			}
			end := fp.finish(t)
			assertCleanEnd(t, end)
			t.Logf("restore session: flow_control=%s relayed_bytes=%s", end["flow_control"], end["relayed_bytes"])
		})
	}
}

// ---- slow readers -----------------------------------------------------------

// resultQuery is a result of about 240 bytes a row, made by the database as
// fast as it can.
func resultQuery(rows int) string {
	return fmt.Sprintf("select g, md5(g::text) as h, repeat(chr(97 + g %% 26), 200) as pad from generate_series(1, %d) g", rows)
}

// readResult reads sql over m's connection: as COPY TO STDOUT when copy,
// else as a SELECT's rows (extended protocol). It hashes the data.
func readResult(ctx context.Context, dsn, sql string, asCopy bool, m *meter) (string, int64, error) {
	conn, err := connectMetered(ctx, dsn, m)
	if err != nil {
		return "", 0, err
	}
	defer conn.Close(context.Background())
	h := &countingHash{h: sha256.New()}
	if asCopy {
		_, err = conn.CopyTo(ctx, h, "copy ("+sql+") to stdout")
	} else {
		rr := conn.ExecParams(ctx, sql, nil, nil, nil, nil)
		var l [4]byte
		for rr.NextRow() {
			for _, v := range rr.Values() {
				binary.BigEndian.PutUint32(l[:], uint32(len(v)))
				h.Write(l[:])
				h.Write(v)
			}
		}
		_, err = rr.Close()
	}
	return hex.EncodeToString(h.h.Sum(nil)), h.n, err
}

type countingHash struct {
	h hash.Hash
	n int64
}

func (c *countingHash) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return c.h.Write(p)
}

var directResults sync.Map // query+mode -> [2]any{hash, n}

// directResult reads a result directly from the cluster, once per query.
func directResult(t *testing.T, pg *pgcluster.Cluster, sql string, asCopy bool) (string, int64) {
	t.Helper()
	key := fmt.Sprint(asCopy, sql)
	if v, ok := directResults.Load(key); ok {
		r := v.([2]any)
		return r[0].(string), r[1].(int64)
	}
	sum, n, err := readResult(context.Background(), pg.DSN(alice, alicePW, "app"), sql, asCopy, &meter{})
	if err != nil {
		t.Fatalf("direct read: %v", err)
	}
	directResults.Store(key, [2]any{sum, n})
	return sum, n
}

// TestFlowSlowReader: a client that reads a large COPY TO STDOUT at a
// throttled pace (the database produces it many times faster) through a
// default-flag spliced proxy, over a TCP and a unix-socket upstream, gets
// exactly the bytes a direct read gets, with no session ended, through flow
// control, and nothing leaks.
func TestFlowSlowReader(t *testing.T) {
	fcConfig(t) // skips early where the path is unavailable
	pg := cluster(t)
	// The reader must be well below what the database produces even on a
	// loaded 2-core machine: at 40 MB/s a CI run once saw the database
	// produce only ~33 MB/s, no backlog, no flow control.
	sql := resultQuery(sized(425_000, 2_300_000)) // ~100 MB; ~530 MB
	rate := sized(15e6, 2e6)                      // ~7 s; ~250 s
	want, size := directResult(t, pg, sql, true)
	t.Logf("result: %d MB, read at %.0f MB/s", size>>20, rate/1e6)
	for _, up := range fcUpstreams(pg) {
		t.Run(up.name, func(t *testing.T) {
			fp := startFCProxy(t, up.addr)
			ctx, cancel := context.WithTimeout(context.Background(), sized(2*time.Minute, 15*time.Minute))
			defer cancel()
			got, n, err := readResult(ctx, fp.aliceDSN("app"), sql, true, &meter{rate: rate})
			if err != nil || got != want || n != size {
				t.Errorf("through the proxy: %d bytes %s (%v); direct %d bytes %s", n, got, err, size, want)
			}
			end := fp.finish(t)
			assertCleanEnd(t, end)
			assertFlowControl(t, end)
		})
	}
}

// TestFlowPausedReader: a client that reads a few MB of a large SELECT
// result, stops reading (seconds; 60 s in a soak), then reads the rest,
// through a default-flag spliced proxy, over a TCP and a unix-socket
// upstream, gets exactly the rows a direct read gets, with no session
// ended, through flow control, and nothing leaks.
func TestFlowPausedReader(t *testing.T) {
	fcConfig(t) // skips early where the path is unavailable
	pg := cluster(t)
	sql := resultQuery(sized(850_000, 2_300_000))
	pause := sized(4*time.Second, 60*time.Second)
	want, size := directResult(t, pg, sql, false)
	for _, up := range fcUpstreams(pg) {
		t.Run(up.name, func(t *testing.T) {
			fp := startFCProxy(t, up.addr)
			ctx, cancel := context.WithTimeout(context.Background(), sized(2*time.Minute, 10*time.Minute))
			defer cancel()
			got, n, err := readResult(ctx, fp.aliceDSN("app"), sql, false, &meter{pauseAfter: 8 << 20, pause: pause})
			if err != nil || got != want || n != size {
				t.Errorf("through the proxy: %d bytes %s (%v); direct %d bytes %s", n, got, err, size, want)
			}
			end := fp.finish(t)
			assertCleanEnd(t, end)
			assertFlowControl(t, end)
		})
	}
}

// ---- bad input ------------------------------------------------------------

// TestFlowClientHalfClose: a client half-closes (shutdown SHUT_WR) in the
// middle of a throttled COPY TO STDOUT and goes on reading. It still gets
// the whole result, byte for byte; then the database sees the client's EOF
// and ends, and the client gets EOF (not a reset). The session ends with a
// session-end line and nothing leaks.
func TestFlowClientHalfClose(t *testing.T) {
	fcConfig(t) // skips early where the path is unavailable
	pg := cluster(t)
	sql := resultQuery(sized(420_000, 2_300_000)) // ~100 MB; ~530 MB
	rate := sized(40e6, 2e6)
	want, size := directResult(t, pg, sql, true)
	for _, up := range fcUpstreams(pg) {
		t.Run(up.name, func(t *testing.T) {
			fp := startFCProxy(t, up.addr)
			ctx, cancel := context.WithTimeout(context.Background(), sized(2*time.Minute, 15*time.Minute))
			defer cancel()
			m := &meter{rate: rate}
			pc, err := connectMetered(ctx, fp.aliceDSN("app"), m)
			if err != nil {
				t.Fatal(err)
			}
			hc, err := pc.Hijack()
			if err != nil {
				t.Fatal(err)
			}
			defer hc.Conn.Close()
			hc.Conn.SetDeadline(time.Now().Add(sized(2*time.Minute, 15*time.Minute)))
			fe := hc.Frontend
			fe.Send(&pgproto3.Query{String: "copy (" + sql + ") to stdout"})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
			h := &countingHash{h: sha256.New()}
			halfClosed, ready := false, false
			began := time.Now()
			for {
				msg, err := fe.Receive()
				if err != nil {
					if !ready {
						t.Fatalf("the connection ended after %d of %d bytes: %v", h.n, size, err)
					}
					if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
						t.Errorf("after the result, want EOF, got %v", err)
					}
					break
				}
				switch msg := msg.(type) {
				case *pgproto3.CopyData:
					h.Write(msg.Data)
					if !halfClosed && h.n >= 8<<20 {
						if err := m.conn.Load().tcp().CloseWrite(); err != nil {
							t.Fatal(err)
						}
						halfClosed = true
					}
				case *pgproto3.ErrorResponse:
					t.Fatalf("error from the database: %s", msg.Message)
				case *pgproto3.ReadyForQuery:
					ready = true
				}
			}
			hc.Conn.Close()
			t.Logf("read %d MB in %v", h.n>>20, time.Since(began).Round(time.Millisecond))
			if got := hex.EncodeToString(h.h.Sum(nil)); got != want || h.n != size {
				t.Errorf("after the half-close: %d bytes %s; direct %d bytes %s", h.n, got, size, want)
			}
			end := fp.finish(t)
			assertCleanEnd(t, end)
			if !eventually(10*time.Second, func() bool { return backends(t, pg, alice) == 0 }) {
				t.Errorf("the database session is still there")
			}
		})
	}
}

// TestFlowClientReset: a client uploading with pgx CopyFrom into a table
// whose trigger stalls the database is reset (SO_LINGER 0, close) once its
// writes stop, while its bytes sit between it and the database. The
// session ends with a session-end line, the database session ends once the
// trigger returns, nothing is loaded (COPY is atomic) and nothing leaks.
func TestFlowClientReset(t *testing.T) {
	fcConfig(t) // skips early where the path is unavailable
	pg := cluster(t)
	// Long enough that the client is seen stalled even on a loaded
	// machine (a 5 s stall was missed once under load and the upload
	// finished before the reset).
	stall := sized(15*time.Second, 20*time.Second)
	for _, up := range fcUpstreams(pg) {
		t.Run(up.name, func(t *testing.T) {
			fp := startFCProxy(t, up.addr)
			table := "fc_reset_" + up.name
			createUploadTable(t, pg, table, 1000, stall)
			defer dropTable(pg, table)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			m := &meter{}
			var copyErr error
			over := make(chan struct{})
			go func() {
				defer close(over)
				copyErr = pgxCopyFrom(ctx, fp.aliceDSN("app"), table, 1_000_000, m)
			}()
			waitStalled(m, 4<<20, over, 30*time.Second)
			t.Logf("resetting after the client wrote %d MB", m.written()>>20)
			if c := m.conn.Load(); c != nil {
				c.tcp().SetLinger(0)
				c.Close()
			}
			<-over
			if err := copyErr; err == nil {
				t.Errorf("CopyFrom succeeded on a reset connection")
			} else if errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("CopyFrom did not end: %v", err)
			}
			end := fp.finish(t)
			assertEndedWithReason(t, end)
			if !eventually(stall+30*time.Second, func() bool { return backends(t, pg, alice) == 0 }) {
				t.Errorf("the database session of the reset client is still there")
			}
			if got := uploadSummary(t, pg, table); !strings.HasPrefix(got, "0 ") {
				t.Errorf("the reset upload left rows: %s", got)
			}
		})
	}
}

// TestFlowDatabaseKilled: the database backend of a pgx CopyFrom is killed
// (SIGKILL) while a trigger stalls it and the client's bytes are held on
// the way, on a throwaway cluster (the kill makes PostgreSQL restart). The
// client gets an error instead of hanging, the session ends with a
// session-end line, and nothing leaks.
func TestFlowDatabaseKilled(t *testing.T) {
	fcConfig(t)
	cluster(t) // the proxy's harness needs the shared one; the kill gets its own
	tp := pgtest.Start(t, pgcluster.Options{
		Method:    pgcluster.ScramSHA256,
		Users:     []pgcluster.User{{Name: alice, Password: alicePW, Superuser: true}},
		Databases: []string{"app"},
	})
	for _, up := range fcUpstreams(tp) {
		t.Run(up.name, func(t *testing.T) {
			if !eventually(60*time.Second, func() bool { _, err := tp.Psql("select 1"); return err == nil }) {
				t.Fatalf("the throwaway cluster did not come back:\n%s", tp.Log())
			}
			fp := startFCProxy(t, up.addr)
			createUploadTable(t, tp, "fc_killed", 1000, time.Hour)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			m := &meter{}
			var copyErr error
			over := make(chan struct{})
			go func() {
				defer close(over)
				copyErr = pgxCopyFrom(ctx, fp.aliceDSN("app"), "fc_killed", 1_000_000, m)
			}()
			waitStalled(m, 4<<20, over, 30*time.Second)
			pid := copyBackend(t, tp)
			t.Logf("killing backend %d after the client wrote %d MB", pid, m.written()>>20)
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			<-over
			if err := copyErr; err == nil {
				t.Errorf("CopyFrom succeeded although its backend was killed")
			} else if errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("the session was not ended after the database died: %v", err)
			} else {
				t.Logf("client: %v", err)
			}
			end := fp.finish(t)
			assertEndedWithReason(t, end)
		})
	}
}

// copyBackend is the PID of the one backend of the cluster running a COPY,
// checked to be a child of its postmaster (it is about to be SIGKILLed).
func copyBackend(t *testing.T, pg *pgcluster.Cluster) int {
	t.Helper()
	out, err := pg.Psql("select pid from pg_stat_activity where query ilike 'copy%' and pid <> pg_backend_pid()")
	if err != nil {
		t.Fatal(err)
	}
	pids := strings.Fields(out)
	if len(pids) != 1 {
		t.Fatalf("want one COPY backend, got %q", out)
	}
	pid, _ := strconv.Atoi(pids[0])
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	if ppid, _ := strconv.Atoi(f[1]); pid <= 0 || ppid != pg.PID() {
		t.Fatalf("process %d is not a backend of the cluster (parent %d, postmaster %d)", pid, ppid, pg.PID())
	}
	return pid
}
