package proto

import (
	"context"
	crand "crypto/rand"
	"errors"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
)

// fakeServer is a test-only PostgreSQL look-alike: it authenticates clients
// with ServerLogin, then says AuthenticationOk, a few ParameterStatus,
// BackendKeyData and ReadyForQuery, and answers every simple query with one
// row "1". The outcome of each login is reported on results.
type fakeServer struct {
	ln      net.Listener
	method  string
	roles   *Roles
	results chan error
	wg      sync.WaitGroup
}

func startFakeServer(t *testing.T, method string, roles *Roles) *fakeServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &fakeServer{ln: ln, method: method, roles: roles, results: make(chan error, 16)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(time.Minute))
				s.results <- s.serve(c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *fakeServer) addr() (string, int) {
	a := s.ln.Addr().(*net.TCPAddr)
	return a.IP.String(), a.Port
}

func (s *fakeServer) serve(c net.Conn) error {
	var buf []byte
	var user string
	for user == "" {
		msg, n, err := NextStartup(buf)
		if err != nil {
			return err
		}
		if n == 0 {
			chunk := make([]byte, 1024)
			k, err := c.Read(chunk)
			if k == 0 {
				return err
			}
			buf = append(buf, chunk[:k]...)
			continue
		}
		buf = buf[n:]
		switch msg := msg.(type) {
		case *pgproto3.SSLRequest, *pgproto3.GSSEncRequest:
			c.Write([]byte{'N'})
		case *StartupMessage:
			user, _ = msg.Get("user")
		default:
			return errors.New("unexpected startup packet")
		}
	}
	r := &msgReader{conn: c, buf: buf}
	sl := NewServerLogin(ServerConfig{Method: s.method, Roles: s.roles, User: user, Rand: crand.Reader})
	out, done := sl.Start()
	c.Write(out)
	for !done {
		m, err := r.next()
		if err != nil {
			return err
		}
		out, done, err = sl.Handle(m)
		if err != nil {
			c.Write(Append(nil, ErrorFor(err)))
			return err
		}
		c.Write(out)
	}
	res := &LoginResult{Params: []pgproto3.ParameterStatus{
		{Name: "server_version", Value: "15.0"}, {Name: "client_encoding", Value: "UTF8"},
		{Name: "standard_conforming_strings", Value: "on"}, {Name: "DateStyle", Value: "ISO, MDY"},
		{Name: "integer_datetimes", Value: "on"},
	}, TxStatus: 'I'}
	c.Write(res.AppendReady(nil, &pgproto3.BackendKeyData{ProcessID: 4242, SecretKey: []byte{1, 2, 3, 4}}))
	for {
		m, err := r.next()
		if err != nil || m.Type == 'X' {
			return nil
		}
		if m.Type == 'Q' {
			c.Write(Append(nil,
				&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("?column?"), DataTypeOID: 23, DataTypeSize: 4, TypeModifier: -1}}},
				&pgproto3.DataRow{Values: [][]byte{[]byte("1")}},
				&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
				&pgproto3.ReadyForQuery{TxStatus: 'I'}))
		}
	}
}

func pgxConnect(host string, port int, user, password string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgcluster.DSN(host, port, user, password, "postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	var one int
	if err := conn.QueryRow(ctx, "SELECT 1", pgx.QueryExecModeSimpleProtocol).Scan(&one); err != nil || one != 1 {
		return errors.Join(errors.New("SELECT 1 through the fake server failed"), err)
	}
	if conn.PgConn().PID() != 4242 {
		return errors.New("client did not get the fake server's key")
	}
	return nil
}

func psqlConnect(t *testing.T, host string, port int, user, password string) (string, error) {
	psql, err := exec.LookPath("psql")
	if err != nil {
		pgtest.SkipOrFail(t, "psql not installed: %v", err)
	}
	cmd := exec.Command(psql, "-X", "-h", host, "-p", strconv.Itoa(port), "-U", user, "-d", "postgres", "-c", `\q`)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+password, "PGSSLMODE=disable", "PGGSSENCMODE=disable", "PGCONNECT_TIMEOUT=60")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestServerLoginRealClients authenticates real pgx and psql clients with
// verifiers taken from a real PostgreSQL's pg_authid.
func TestServerLoginRealClients(t *testing.T) {
	c := pg(t)
	roles := NewRoles()
	for _, u := range []string{"u_md5", "u_scram", "u_password", "u_utf8"} {
		if err := roles.Set(u, verifierOf(t, c, u)); err != nil {
			t.Fatalf("%s: %v", u, err)
		}
	}
	if v, _ := roles.Lookup("u_md5"); v.IsSCRAM() {
		t.Fatal("u_md5 should have an md5 verifier")
	}
	type tc struct {
		method, user string
		noPgx        bool
	}
	cases := []tc{
		{MethodTrust, "anyone", false},
		{MethodPassword, "u_password", false}, // cleartext against a SCRAM verifier
		{MethodPassword, "u_md5", false},      // cleartext against an MD5 verifier
		{MethodMD5, "u_md5", false},
		{MethodMD5, "u_scram", false}, // SCRAM verifier: falls back to SCRAM like PostgreSQL
		{MethodSCRAM, "u_scram", false},
		// libpq SASLprep's the password like PostgreSQL does; pgx applies
		// PRECIS OpaqueString (NFC, not NFKC) and fails against PostgreSQL
		// with this password: it must fare the same against ServerLogin.
		{MethodSCRAM, "u_utf8", true},
		// Cleartext: the server side SASLpreps, as PostgreSQL would.
		{MethodPassword, "u_utf8", false},
	}
	for _, x := range cases {
		t.Run(x.method+"/"+x.user, func(t *testing.T) {
			s := startFakeServer(t, x.method, roles)
			host, port := s.addr()
			pw := pgPassword(x.user)
			if x.noPgx {
				// Whatever pgx does with this password, it must fare the
				// same against the fake server as against PostgreSQL.
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				direct, derr := pgx.Connect(ctx, c.DSN(x.user, pw, "postgres"))
				if derr == nil {
					direct.Close(ctx)
				}
				ferr := pgxConnect(host, port, x.user, pw)
				<-s.results
				if (derr == nil) != (ferr == nil) {
					t.Fatalf("pgx against PostgreSQL: %v; against ServerLogin: %v", derr, ferr)
				}
			} else {
				if err := pgxConnect(host, port, x.user, pw); err != nil {
					t.Fatalf("pgx: %v", err)
				}
				if err := <-s.results; err != nil {
					t.Fatalf("server: %v", err)
				}
			}
			if out, err := psqlConnect(t, host, port, x.user, pw); err != nil {
				t.Fatalf("psql: %v: %s", err, out)
			}
			if err := <-s.results; err != nil {
				t.Fatalf("server (psql): %v", err)
			}
			if x.method == MethodTrust {
				return
			}
			for _, user := range []string{x.user, "nobody"} {
				err := pgxConnect(host, port, user, "wrong")
				var pe *pgconn.PgError
				if !errors.As(err, &pe) || pe.Code != "28P01" || pe.Message != `password authentication failed for user "`+user+`"` {
					t.Fatalf("pgx wrong password for %s: %v", user, err)
				}
				<-s.results
				out, err := psqlConnect(t, host, port, user, "wrong")
				if err == nil || !strings.Contains(out, `password authentication failed for user "`+user+`"`) {
					t.Fatalf("psql wrong password for %s: %v %s", user, err, out)
				}
				<-s.results
			}
		})
	}
}
