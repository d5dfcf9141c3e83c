package spare

import (
	"errors"
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
)

// startPG starts a PostgreSQL server that logs every connection it
// accepts, with extra settings.
func startPG(t *testing.T, settings map[string]string) *pgcluster.Cluster {
	t.Helper()
	s := map[string]string{"log_connections": "on"}
	for k, v := range settings {
		s[k] = v
	}
	return pgtest.Start(t, pgcluster.Options{Method: pgcluster.ScramSHA256, Settings: s})
}

func tcpDialer(addr string) func() (net.Conn, error) {
	return func() (net.Conn, error) { return net.DialTimeout("tcp", addr, 5*time.Second) }
}

// waitLen waits up to 10 s for the pool to hold n spares.
func waitLen(t *testing.T, p *Pool, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); p.Len() != n; {
		if time.Now().After(deadline) {
			t.Fatalf("the pool holds %d spares, want %d (stats: opened %d, dial errors %d)", p.Len(), n, p.stats.Opened.Load(), p.stats.DialErrors.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// startsALogin sends a StartupMessage on nc and wants the database's
// first authentication request back: a backend is serving nc.
func startsALogin(t *testing.T, nc net.Conn) {
	t.Helper()
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	fe := pgproto3.NewFrontend(nc, nc)
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": "postgres", "database": "postgres"}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	msg, err := fe.Receive()
	if err != nil {
		t.Fatalf("no answer to the StartupMessage: %v", err)
	}
	if _, ok := msg.(*pgproto3.AuthenticationSASL); !ok {
		t.Fatalf("the database answered the StartupMessage with %T, want AuthenticationSASL", msg)
	}
}

// A spare is opened when a login has succeeded (Refill), before the next
// login asks: the database accepted it (and forked its backend) before
// Get handed it out, and the backend then serves a login on it. Get alone
// opens nothing.
func TestSpareIsOpenedAheadAndServesALogin(t *testing.T) {
	pg := startPG(t, nil)
	p := New(1, time.Minute, tcpDialer(pg.Addr()), nil)
	defer p.Close()

	if nc := p.Get(); nc != nil {
		t.Fatal("a new pool handed out a spare before any was opened")
	}
	time.Sleep(100 * time.Millisecond)
	if n := p.Len(); n != 0 {
		t.Fatalf("Get opened %d spares; only Refill may", n)
	}
	received := func() int { return strings.Count(pg.Log(), "connection received:") }
	n := received()
	p.Refill()
	waitLen(t, p, 1)
	// The backend logs the connection as it starts, before it reads
	// anything; under load it starts milliseconds after the connect.
	for deadline := time.Now().Add(10 * time.Second); received() == n; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the database logged no connection for the spare:\n%s", pg.Log())
		}
	}
	logBefore := pg.Log()
	nc := p.Get()
	if nc == nil {
		t.Fatal("Get returned no spare from a full pool")
	}
	defer nc.Close()
	port := strconv.Itoa(nc.LocalAddr().(*net.TCPAddr).Port)
	if !regexp.MustCompile(`connection received: host=127\.0\.0\.1 port=` + port + `\b`).MatchString(logBefore) {
		t.Fatalf("the database had not accepted the spare (local port %s) before Get handed it out; its log:\n%s", port, logBefore)
	}
	startsALogin(t, nc)
	if got := p.stats.Used.Load(); got != 1 {
		t.Errorf("Used = %d, want 1", got)
	}
	time.Sleep(100 * time.Millisecond)
	if n := p.Len(); n != 0 {
		t.Fatalf("handing out a spare opened %d more; only Refill may", n)
	}
	p.Refill()
	waitLen(t, p, 1)
	if got := p.stats.Opened.Load(); got != 2 {
		t.Errorf("Opened = %d, want 2", got)
	}
}

// A spare the database closed (here its authentication_timeout of 1 s
// ended the backend's wait for a StartupMessage) is never handed to a
// login; the next one is.
func TestDeadSpareIsSkipped(t *testing.T) {
	pg := startPG(t, map[string]string{"authentication_timeout": "'1s'"})
	p := New(1, time.Minute, tcpDialer(pg.Addr()), nil)
	defer p.Close()
	p.Refill()
	waitLen(t, p, 1)
	time.Sleep(2 * time.Second) // the backend gives up after 1 s
	if nc := p.Get(); nc != nil {
		nc.Close()
		t.Fatal("Get handed out a spare the database had closed")
	}
	if got := p.stats.Dead.Load(); got != 1 {
		t.Fatalf("Dead = %d, want 1", got)
	}
	p.Refill()
	waitLen(t, p, 1)
	nc := p.Get()
	if nc == nil {
		t.Fatal("no spare after the refill")
	}
	defer nc.Close()
	startsALogin(t, nc)
}

// With no logins, spares are closed at MaxAge and not replaced: an idle
// proxy holds no database connections.
func TestUnusedSparesExpire(t *testing.T) {
	pg := startPG(t, nil)
	p := New(2, 300*time.Millisecond, tcpDialer(pg.Addr()), nil)
	defer p.Close()
	p.Refill()
	waitLen(t, p, 2)
	waitLen(t, p, 0)
	time.Sleep(600 * time.Millisecond)
	if n := p.Len(); n != 0 {
		t.Fatalf("%d spares were opened with no login asking", n)
	}
	if o, e := p.stats.Opened.Load(), p.stats.Expired.Load(); o != 2 || e != 2 {
		t.Fatalf("opened %d, expired %d; want 2 and 2", o, e)
	}
}

// Close closes the spares (the database sees the connections end) and
// Get hands out none after it.
func TestCloseClosesSpares(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	p := New(1, time.Minute, tcpDialer(ln.Addr().String()), nil)
	p.Refill()
	waitLen(t, p, 1)
	server := <-accepted
	defer server.Close()
	p.Close()
	if n := p.Len(); n != 0 {
		t.Fatalf("%d spares held after Close", n)
	}
	_ = server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := server.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("the spare was not closed by Close: the server's read returned %v", err)
	}
	p.Refill()
	if nc := p.Get(); nc != nil {
		t.Fatal("Get handed out a spare after Close")
	}
	time.Sleep(100 * time.Millisecond)
	select {
	case <-accepted:
		t.Fatal("Refill after Close opened a connection")
	default:
	}
}

// A database that cannot be reached costs one dial per Refill (per
// successful login): a failed refill is not retried on its own.
func TestFailedDialIsNotRetried(t *testing.T) {
	if New(0, time.Minute, nil, nil) != nil {
		t.Fatal("New(0) made a pool")
	}
	var nilPool *Pool
	nilPool.Refill()
	if nilPool.Get() != nil || nilPool.Len() != 0 {
		t.Fatal("a nil pool handed out a spare")
	}
	nilPool.Close()

	var dials atomic.Int64
	p := New(1, time.Minute, func() (net.Conn, error) {
		dials.Add(1)
		return nil, errors.New("connection refused")
	}, nil)
	defer p.Close()
	for i := 1; i <= 3; i++ {
		p.Refill()
		for deadline := time.Now().Add(5 * time.Second); p.stats.DialErrors.Load() < int64(i); {
			if time.Now().After(deadline) {
				t.Fatalf("Refill %d dialed nothing", i)
			}
			time.Sleep(time.Millisecond)
		}
	}
	time.Sleep(200 * time.Millisecond)
	if n := dials.Load(); n != 3 {
		t.Fatalf("%d dials for 3 logins", n)
	}
}
