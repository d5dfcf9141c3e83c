package loop_test

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
)

// rawStartupPacket builds a 3.0 StartupMessage from name/value pairs in the
// given order, duplicates and all (pgproto3 keeps parameters in a map).
func rawStartupPacket(pairs ...string) []byte {
	body := binary.BigEndian.AppendUint32(nil, pgproto3.ProtocolVersion30)
	for _, s := range pairs {
		body = append(append(body, s...), 0)
	}
	body = append(body, 0)
	return append(binary.BigEndian.AppendUint32(nil, uint32(4+len(body))), body...)
}

// fakeDB is a database stand-in that records the startup packet it gets and
// then runs script on the connection.
type fakeDB struct {
	ln      net.Listener
	startup chan []byte
	written atomic.Int64 // bytes the script managed to write
	done    chan error   // the script's end (nil: the proxy hung up)
}

func startFakeDB(t *testing.T, script func(c net.Conn, db *fakeDB) error) *fakeDB {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	db := &fakeDB{ln: ln, startup: make(chan []byte, 16), done: make(chan error, 16)}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var buf []byte
				tmp := make([]byte, 16<<10)
				for {
					msg, n, err := proto.NextStartup(buf)
					if err != nil {
						db.done <- err
						return
					}
					if msg != nil {
						db.startup <- append([]byte(nil), buf[:n]...)
						break
					}
					k, err := c.Read(tmp)
					buf = append(buf, tmp[:k]...)
					if err != nil {
						db.done <- err
						return
					}
				}
				db.done <- script(c, db)
			}()
		}
	}()
	return db
}

// stream writes msg until a write fails (the proxy hung up: nil) or limit
// bytes are out (an error: the proxy kept taking them).
func (db *fakeDB) stream(c net.Conn, msg []byte, limit int64) error {
	var block []byte
	for len(block) < 64<<10 {
		block = append(block, msg...)
	}
	for db.written.Load() < limit {
		_ = c.SetWriteDeadline(time.Now().Add(20 * time.Second))
		n, err := c.Write(block)
		db.written.Add(int64(n))
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				return fmt.Errorf("the proxy stopped reading but kept the connection open")
			}
			return nil
		}
	}
	return fmt.Errorf("the proxy took %d bytes from a database whose client reads nothing", db.written.Load())
}

// TestStartupParametersVerbatim: the startup packet reaches the database
// byte for byte as the client sent it — order, case and duplicates kept —
// with only pgmfa's own parameters cut out.
func TestStartupParametersVerbatim(t *testing.T) {
	db := startFakeDB(t, func(c net.Conn, db *fakeDB) error {
		_, err := c.Write(proto.Append(nil, proto.Fatal("28000", "fake database", "")))
		return err
	})
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Upstream = db.ln.Addr().String() })
	sent := rawStartupPacket(
		"user", "nobody", "database", "app", "application_name", "a b",
		"search_path", "a", "pgmfa.note", "x", "SEARCH_PATH", "b",
		"options", "-c work_mem=1MB -c pgmfa.code=123456 -c geqo=off",
		"zz", "1", "DateStyle", "ISO", "aa", "2", "user", svc)
	want := rawStartupPacket(
		"user", "nobody", "database", "app", "application_name", "a b",
		"search_path", "a", "SEARCH_PATH", "b",
		"options", "-c work_mem=1MB  -c geqo=off",
		"zz", "1", "DateStyle", "ISO", "aa", "2", "user", svc)
	for i := 0; i < 3; i++ {
		c := dialRaw(t, p)
		c.write(sent)
		select {
		case got := <-db.startup:
			if !bytes.Equal(got, want) {
				t.Fatalf("the database got\n%q\nwant\n%q", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("the startup packet never reached the database (client got %+v)", c.expectRefusal())
		}
		c.conn.Close()
	}
}

// pgSession logs in with a raw startup packet (SCRAM or trust, driven by
// the proxy's own client machine) and returns the values of the queried
// settings, or the error the server or proxy sent.
func pgSession(t *testing.T, addr string, packet []byte, password string, timeout time.Duration) ([]string, error) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	c := &rawClient{t: t, conn: conn}
	c.write(packet)
	up := proto.NewUpstreamLogin(proto.UpstreamConfig{User: "ignored", Password: password, Rand: rand.Reader})
	for done := false; !done; {
		m, err := c.next()
		if err != nil {
			return nil, err
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			return nil, &proto.ServerError{Resp: e}
		}
		out, d, err := up.Handle(m)
		if err != nil {
			return nil, err
		}
		done = d
		if len(out) > 0 {
			c.write(out)
		}
	}
	c.write(proto.Append(nil, &pgproto3.Query{String: "select current_user, current_setting('search_path'), current_setting('application_name'), current_setting('work_mem')"}))
	for {
		m, err := c.nextRaw()
		if err != nil {
			return nil, err
		}
		switch m.Type {
		case 'E':
			return nil, fmt.Errorf("query failed: %q", m.Body)
		case 'D':
			var vals []string
			b := m.Body[2:]
			for len(b) >= 4 {
				n := int32(binary.BigEndian.Uint32(b))
				b = b[4:]
				if n < 0 {
					vals = append(vals, "NULL")
					continue
				}
				vals = append(vals, string(b[:n]))
				b = b[n:]
			}
			return vals, nil
		}
	}
}

// TestStartupDuplicatesLikePostgres: parameters that repeat (exactly, or
// as the same setting in another case) have the effect through the proxy
// they have on PostgreSQL itself; and the user the proxy asks MFA for is
// the user PostgreSQL logs in (the last "user"), so a repeated user cannot
// slip past MFA.
func TestStartupDuplicatesLikePostgres(t *testing.T) {
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.MFATimeout = 2 * time.Second })
	proxyAddr := net.JoinHostPort(p.host, strconv.Itoa(p.port))
	for _, tc := range []struct {
		name       string
		via, plain []string // via the proxy; straight to PostgreSQL (pgmfa parts cut)
		password   string
	}{
		{"search_path then SEARCH_PATH",
			[]string{"user", svc, "database", "app", "search_path", "a", "SEARCH_PATH", "b"}, nil, svcPW},
		{"SEARCH_PATH then search_path",
			[]string{"user", svc, "database", "app", "SEARCH_PATH", "b", "search_path", "a"}, nil, svcPW},
		{"user twice",
			[]string{"user", alice, "database", "app", "user", svc}, nil, svcPW},
		{"database twice",
			[]string{"user", svc, "database", "nope", "application_name", "x", "database", "app"}, nil, svcPW},
		{"options twice, the last only pgmfa's",
			[]string{"user", svc, "database", "app", "options", "-c search_path=x", "options", "-c pgmfa.code=123456"},
			[]string{"user", svc, "database", "app", "options", "-c search_path=x", "options", ""}, svcPW},
		{"options twice",
			[]string{"user", svc, "database", "app", "options", "-c work_mem=2MB", "options", "-c pgmfa.code=123456 -c search_path=y"},
			[]string{"user", svc, "database", "app", "options", "-c work_mem=2MB", "options", " -c search_path=y"}, svcPW},
	} {
		t.Run(tc.name, func(t *testing.T) {
			plain := tc.plain
			if plain == nil {
				plain = tc.via
			}
			want, err := pgSession(t, p.pg.Addr(), rawStartupPacket(plain...), tc.password, 20*time.Second)
			if err != nil {
				t.Fatalf("straight to PostgreSQL: %v", err)
			}
			got, err := pgSession(t, proxyAddr, rawStartupPacket(tc.via...), tc.password, 20*time.Second)
			if err != nil {
				t.Fatalf("through pgmfa: %v (PostgreSQL itself gives %q)", err, want)
			}
			if strings.Join(got, "|") != strings.Join(want, "|") {
				t.Fatalf("through pgmfa %q, PostgreSQL itself %q", got, want)
			}
		})
	}
	// The MFA user is the last "user": svc first, alice last, no code.
	_, err := pgSession(t, proxyAddr, rawStartupPacket("user", svc, "database", "app", "user", alice), alicePW, 30*time.Second)
	var se *proto.ServerError
	if !errors.As(err, &se) || se.Resp.Code != "28000" {
		t.Fatalf("user svc then alice without a code: want 28000 (MFA for alice), got %v", err)
	}
	// And with alice's code it is alice's session.
	got, err := pgSession(t, proxyAddr, rawStartupPacket("user", svc, "database", "app", "user", alice,
		"options", "-c pgmfa.code="+p.code(alice)), alicePW, 30*time.Second)
	if err != nil || got[0] != alice {
		t.Fatalf("user svc then alice with alice's code: %q %v", got, err)
	}
}
