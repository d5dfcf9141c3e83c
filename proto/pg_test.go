package proto

// Tests against a real PostgreSQL. One cluster serves the whole package:
// one user per method (pg_hba per-user overrides), started on first use and
// stopped in TestMain.

import (
	"bytes"
	crand "crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
)

// The cluster's users, one per method.
var pgUsers = []pgcluster.User{
	{Name: "u_trust", Method: pgcluster.Trust},
	{Name: "u_password", Password: "pw secret", Method: pgcluster.Password},
	{Name: "u_md5", Password: "md5 secret", Method: pgcluster.MD5},
	{Name: "u_scram", Password: "scram secret", Method: pgcluster.ScramSHA256},
	// Non-ASCII: PostgreSQL stores the verifier of the SASLprep'd form
	// ("IIX x": U+2168 is NFKC "IX", U+00AD vanishes, U+00A0 is a space).
	{Name: "u_utf8", Password: "I\u2168\u00AD\u00A0x", Method: pgcluster.ScramSHA256},
}

func pgPassword(user string) string {
	for _, u := range pgUsers {
		if u.Name == user {
			return u.Password
		}
	}
	return ""
}

// cluster is started by the first test that needs it.
var cluster = pgtest.Shared{Options: pgcluster.Options{
	Method:   pgcluster.ScramSHA256,
	Users:    pgUsers,
	Settings: map[string]string{"log_statement": "'all'"},
}}

func TestMain(m *testing.M) {
	code := m.Run()
	if err := cluster.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "stop PostgreSQL:", err)
	}
	os.Exit(code)
}

// pg returns the shared cluster, skipping under -short and (outside CI)
// when PostgreSQL cannot be started here.
func pg(t *testing.T) *pgcluster.Cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: skipping tests against a real PostgreSQL")
	}
	return cluster.Get(t)
}

// recordingReader remembers what was read from it (the SCRAM nonce), so a
// login can be replayed with the same randomness.
type recordingReader struct {
	r   io.Reader
	got []byte
}

func (r *recordingReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.got = append(r.got, p[:n]...)
	return n, err
}

// exchange is a captured login: what the server sent and what the
// upstream machine answered (after the startup packet).
type exchange struct {
	Method   string `json:"method"`
	User     string `json:"user"`
	Password string `json:"password"`
	Rand     []byte `json:"rand"`
	Server   []byte `json:"server"`
	Client   []byte `json:"client"`
}

// msgReader frames messages off a connection.
type msgReader struct {
	conn net.Conn
	buf  []byte
}

func (r *msgReader) next() (Message, error) {
	for {
		m, n, err := NextMessage(r.buf, 0)
		if err != nil {
			return Message{}, err
		}
		if n > 0 {
			m.Body = append([]byte(nil), m.Body...)
			r.buf = r.buf[n:]
			return m, nil
		}
		chunk := make([]byte, 4096)
		k, err := r.conn.Read(chunk)
		r.buf = append(r.buf, chunk[:k]...)
		if err != nil && k == 0 {
			return Message{}, err
		}
	}
}

// loginUpstream drives an UpstreamLogin over a real TCP connection.
// mutate, if set, may alter each server message before the machine sees it.
func loginUpstream(t *testing.T, addr string, cfg UpstreamConfig, mutate func(Message) Message) (*UpstreamLogin, *exchange, error) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Minute)) // a hang guard, not an assertion
	rec := &recordingReader{r: crand.Reader}
	cfg.Rand = rec
	u := NewUpstreamLogin(cfg)
	ex := &exchange{User: cfg.User, Password: cfg.Password}
	if _, err := conn.Write(u.Start()); err != nil {
		t.Fatal(err)
	}
	r := &msgReader{conn: conn}
	for {
		m, err := r.next()
		if err != nil {
			t.Fatalf("reading from server: %v", err)
		}
		ex.Server = m.AppendRaw(ex.Server)
		if mutate != nil {
			m = mutate(m)
		}
		bm, err := DecodeBackend(m)
		if err != nil {
			return u, ex, err
		}
		out, done, err := u.Handle(bm)
		if err != nil {
			return u, ex, err
		}
		if out != nil {
			ex.Client = append(ex.Client, out...)
			if _, err := conn.Write(out); err != nil {
				t.Fatal(err)
			}
		}
		if done {
			ex.Rand = rec.got
			ex.Method = u.Result().Method
			return u, ex, nil
		}
	}
}

func TestUpstreamLoginRealPostgres(t *testing.T) {
	c := pg(t)
	methods := map[string]string{"u_trust": "trust", "u_password": "password", "u_md5": "md5", "u_scram": "scram-sha-256"}
	for _, user := range []string{"u_trust", "u_password", "u_md5", "u_scram"} {
		t.Run(methods[user], func(t *testing.T) {
			u, ex, err := loginUpstream(t, c.Addr(), UpstreamConfig{
				User: user, Database: "postgres", Password: pgPassword(user),
				Params: []StartupParam{{Name: "application_name", Value: "pgmfa-test"}},
			}, nil)
			if err != nil {
				t.Fatalf("login: %v", err)
			}
			r := u.Result()
			if r.Method != methods[user] {
				t.Errorf("method %q, want %q", r.Method, methods[user])
			}
			if r.Key == nil || r.TxStatus != 'I' {
				t.Errorf("result %+v", r)
			}
			var app string
			for _, p := range r.Params {
				if p.Name == "application_name" {
					app = p.Value
				}
			}
			if app != "pgmfa-test" {
				t.Errorf("application_name = %q", app)
			}
			if os.Getenv("PGMFA_RECORD") != "" {
				b, _ := json.MarshalIndent(ex, "", "  ")
				if err := os.WriteFile(filepath.Join("testdata", "login_"+ex.Method+".json"), append(b, '\n'), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
	for _, user := range []string{"u_password", "u_md5", "u_scram"} {
		t.Run("wrong password "+methods[user], func(t *testing.T) {
			_, _, err := loginUpstream(t, c.Addr(), UpstreamConfig{User: user, Database: "postgres", Password: "wrong"}, nil)
			var se *ServerError
			if !errors.As(err, &se) || se.Resp.Code != "28P01" || se.Resp.Message != fmt.Sprintf("password authentication failed for user %q", user) {
				t.Fatalf("err = %v, want ServerError 28P01", err)
			}
		})
	}
	t.Run("tampered server signature", func(t *testing.T) {
		tampered := false
		_, _, err := loginUpstream(t, c.Addr(), UpstreamConfig{User: "u_scram", Database: "postgres", Password: pgPassword("u_scram")},
			func(m Message) Message {
				// Flip one bit of the server signature in the SASLFinal.
				if m.Type == 'R' && len(m.Body) > 6 && m.Body[3] == authSASLFinal {
					sig, err := base64.StdEncoding.DecodeString(string(m.Body[6:]))
					if err != nil {
						t.Fatalf("server-final %q", m.Body[4:])
					}
					sig[len(sig)-1] ^= 1
					m.Body = append(m.Body[:6:6], base64.StdEncoding.EncodeToString(sig)...)
					tampered = true
				}
				return m
			})
		var ae *AuthError
		if !tampered || !errors.As(err, &ae) || !strings.Contains(ae.Message, "signature does not match") {
			t.Fatalf("tampered=%v err=%v, want AuthError", tampered, err)
		}
	})
	t.Run("iteration bound", func(t *testing.T) {
		_, _, err := loginUpstream(t, c.Addr(), UpstreamConfig{User: "u_scram", Database: "postgres", Password: "x", MaxSCRAMIterations: 100}, nil)
		var ae *AuthError
		if !errors.As(err, &ae) {
			t.Fatalf("err = %v, want AuthError (4096 > 100 iterations)", err)
		}
	})
	t.Run("protocol 3.2 negotiated down", func(t *testing.T) {
		// PostgreSQL 15 speaks 3.0 only: it answers a 3.2 startup with
		// NegotiateProtocolVersion, and the login goes on.
		u, _, err := loginUpstream(t, c.Addr(), UpstreamConfig{User: "u_scram", Database: "postgres", Password: pgPassword("u_scram"),
			ProtocolVersion: pgproto3.ProtocolVersion32}, nil)
		if err != nil {
			t.Fatal(err)
		}
		n := u.Result().Negotiate
		// The field carries the whole version number (PG_PROTOCOL_LATEST),
		// not just the minor, whatever its name says.
		if n == nil || n.NewestMinorProtocol != pgproto3.ProtocolVersion30 {
			t.Fatalf("Negotiate = %+v, want 3.0 from PostgreSQL 15", n)
		}
	})
	t.Run("SASLprep", func(t *testing.T) {
		for _, pw := range []string{pgPassword("u_utf8"), "IIX x", "I\u2168 x"} {
			if _, _, err := loginUpstream(t, c.Addr(), UpstreamConfig{User: "u_utf8", Database: "postgres", Password: pw}, nil); err != nil {
				t.Errorf("password %q: %v", pw, err)
			}
		}
	})
	t.Run("unknown database", func(t *testing.T) {
		_, _, err := loginUpstream(t, c.Addr(), UpstreamConfig{User: "u_trust", Database: "nope"}, nil)
		var se *ServerError
		if !errors.As(err, &se) || se.Resp.Code != "3D000" {
			t.Fatalf("err = %v, want ServerError 3D000", err)
		}
	})
}

// TestUpstreamReplay replays the logins captured from PostgreSQL 15 in
// testdata (PGMFA_RECORD=1 go test -run TestUpstreamLoginRealPostgres
// rewrites them), with the recorded nonce injected: the machine must send
// byte for byte what it sent to the real server, and accept its answers
// (including, for SCRAM, the server signature).
func TestUpstreamReplay(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join("testdata", "login_*.json"))
	if len(files) < 4 {
		t.Fatalf("want captured logins for 4 methods in testdata, found %d", len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			var ex exchange
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(b, &ex); err != nil {
				t.Fatal(err)
			}
			u := NewUpstreamLogin(UpstreamConfig{User: ex.User, Database: "postgres", Password: ex.Password, Rand: bytes.NewReader(ex.Rand)})
			var sent []byte
			done := false
			buf := ex.Server
			for len(buf) > 0 {
				m, n, err := NextMessage(buf, 0)
				if err != nil || n == 0 {
					t.Fatalf("framing: %v", err)
				}
				buf = buf[n:]
				bm, err := DecodeBackend(m)
				if err != nil {
					t.Fatal(err)
				}
				out, d, err := u.Handle(bm)
				if err != nil {
					t.Fatal(err)
				}
				sent, done = append(sent, out...), d
			}
			if !done || !bytes.Equal(sent, ex.Client) {
				t.Fatalf("done=%v\nsent %q\nwant %q", done, sent, ex.Client)
			}
			if u.Result().Method != ex.Method {
				t.Fatalf("method %q, want %q", u.Result().Method, ex.Method)
			}
			if ex.Method == "scram-sha-256" {
				// A different password must fail on the recorded signature.
				u := NewUpstreamLogin(UpstreamConfig{User: ex.User, Password: ex.Password + "x", Rand: bytes.NewReader(ex.Rand)})
				buf := ex.Server
				var err error
				for len(buf) > 0 && err == nil {
					m, n, _ := NextMessage(buf, 0)
					buf = buf[n:]
					bm, _ := DecodeBackend(m)
					_, _, err = u.Handle(bm)
				}
				var ae *AuthError
				if !errors.As(err, &ae) {
					t.Fatalf("replay with a wrong password: %v", err)
				}
			}
		})
	}
}

// verifierOf fetches a role's verifier from pg_authid.
func verifierOf(t *testing.T, c *pgcluster.Cluster, user string) string {
	t.Helper()
	v, err := c.Psql("SELECT rolpassword FROM pg_authid WHERE rolname = " + pgcluster.QuoteLiteral(user))
	if err != nil || v == "" {
		t.Fatalf("verifier of %s: %q %v", user, v, err)
	}
	return v
}
