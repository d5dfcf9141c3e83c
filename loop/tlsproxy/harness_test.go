package tlsproxy_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/loop/internal/testlog"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/loop/tlsproxy"
	"github.com/pgmfa/pgmfa/loop/tlsproxy/testpki"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
	"github.com/pgmfa/pgmfa/proto/session"
)

const (
	goodCode = "123456"
	alicePW  = "pw"
	carolPW  = "cpw" // pg_hba "password": a cleartext exchange a test can write by hand
)

// The test PKI (package testpki), made once per run.
type pki = testpki.PKI

var (
	testPKI *pki
	pkiOnce sync.Once
	pkiErr  error
	plainPG = pgtest.Shared{Options: pgcluster.Options{ // ssl=off, log_statement=all
		Method: pgcluster.ScramSHA256, Users: testUsers,
		Settings: map[string]string{"log_statement": "'all'"},
	}}
	sslPG   pgtest.Shared // ssl=on with the test certificate (Options set by withSSL)
	sslOpts sync.Once
)

func TestMain(m *testing.M) {
	code := m.Run()
	plainPG.Stop()
	sslPG.Stop()
	if testPKI != nil {
		testPKI.Close()
	}
	os.Exit(code)
}

func certs(t *testing.T) *pki {
	t.Helper()
	pkiOnce.Do(func() { testPKI, pkiErr = testpki.New() })
	if pkiErr != nil {
		t.Fatal(pkiErr)
	}
	return testPKI
}

var testUsers = []pgcluster.User{
	{Name: "alice", Password: alicePW, Superuser: true},
	{Name: "carol", Password: carolPW, Method: pgcluster.Password},
}

// plain is a PostgreSQL without TLS; log_statement=all so tests can prove
// what reached it.
func plain(t *testing.T) *pgcluster.Cluster {
	t.Helper()
	return plainPG.Get(t)
}

// withSSL is a PostgreSQL with ssl=on and the test certificate.
func withSSL(t *testing.T) *pgcluster.Cluster {
	t.Helper()
	p := certs(t)
	sslOpts.Do(func() {
		sslPG.Options = pgcluster.Options{
			Method: pgcluster.ScramSHA256, Users: testUsers,
			SSL: &pgcluster.SSLFiles{CertFile: p.CertFile, KeyFile: p.KeyFile},
		}
	})
	return sslPG.Get(t)
}

// syncBuffer collects the proxy's log for assertions.
type syncBuffer = testlog.Buffer

// setup describes a proxy under test.
type setup struct {
	noCerts          bool
	mode             session.TLSMode // zero: TLSAllow when certificates are given
	auth             session.Auth
	pg               *pgcluster.Cluster // default: plain(t)
	upTLS            tlsproxy.UpstreamTLS
	mfaTimeout       time.Duration
	handshakeTimeout time.Duration
	// asLoop makes the accept loop behave like package loop in front of
	// the driver: it reads the first packet itself and hands over with
	// StartTLS (an SSLRequest answered by Reply 'S', or a direct TLS
	// handshake with the bytes read as ReadAhead).
	asLoop bool
}

// proxy is a Driver behind a plain net.Listener accept loop: every
// connection is handed over from its first byte (StartTLS false), so the
// driver answers SSLRequest itself.
type proxy struct {
	t      *testing.T
	d      *tlsproxy.Driver
	ln     net.Listener
	port   int
	logs   *syncBuffer
	dials  atomic.Int64
	done   atomic.Int64
	accept sync.WaitGroup

	mu      sync.Mutex
	cancels map[string]uint64 // registered cancel keys → session id
	routed  atomic.Int64

	closeOnce sync.Once
}

func keyOf(pid uint32, secret []byte) string { return strconv.Itoa(int(pid)) + ":" + string(secret) }

func startProxy(t *testing.T, s setup) *proxy {
	t.Helper()
	pg := s.pg
	if pg == nil {
		pg = plain(t)
	}
	p := &proxy{t: t, logs: &syncBuffer{}, cancels: map[string]uint64{}}
	var certsObj *tlsproxy.Certs
	mode := s.mode
	if !s.noCerts {
		k := certs(t)
		var err error
		if certsObj, err = tlsproxy.LoadCerts(k.CertFile, k.KeyFile); err != nil {
			t.Fatal(err)
		}
		if mode == session.TLSOff {
			mode = session.TLSAllow
		}
	}
	upAddr, err := net.ResolveTCPAddr("tcp", pg.Addr())
	if err != nil {
		t.Fatal(err)
	}
	dial, err := tlsproxy.Dialer(upAddr, s.upTLS, 0)
	if err != nil {
		t.Fatal(err)
	}
	p.d = tlsproxy.New(tlsproxy.Config{
		Certs:   certsObj,
		Mode:    mode,
		Session: session.Config{Auth: s.auth},
		DialUpstream: func(ctx context.Context) (net.Conn, error) {
			p.dials.Add(1)
			return dial(ctx)
		},
		UpstreamName:     pg.Addr(),
		MFATimeout:       s.mfaTimeout,
		HandshakeTimeout: s.handshakeTimeout,
		Logger:           slog.New(slog.NewTextHandler(p.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Hooks: tlsproxy.Hooks{
			MFA: func(req *session.MFARequest, _ uint64, addr string, decide func(mfa.Path, mfa.Outcome)) (func(), bool) {
				if req.Code == "" {
					// Out-of-band approval that never comes: the MFA timeout ends it.
					return func() {}, true
				}
				path := mfa.PathCode
				if req.Source == session.SourcePassword {
					path = mfa.PathPassword
				}
				if req.Code == goodCode {
					decide(path, mfa.Outcome{OK: true})
				} else {
					decide(path, mfa.Outcome{Reason: mfa.ReasonBadCode, Code: mfa.SQLState,
						Message: fmt.Sprintf("MFA code for user %q is not valid", req.User), Hint: "send the current code"})
				}
				return func() {}, false
			},
			RegisterCancel: func(key *pgproto3.BackendKeyData, id uint64) func() {
				k := keyOf(key.ProcessID, key.SecretKey)
				p.mu.Lock()
				p.cancels[k] = id
				p.mu.Unlock()
				return func() {
					p.mu.Lock()
					delete(p.cancels, k)
					p.mu.Unlock()
				}
			},
			RouteCancel: func(req *pgproto3.CancelRequest, addr string) bool {
				// Known keys only (package loop also forwards unknown
				// keys, rate limited; its tests cover that).
				p.mu.Lock()
				_, known := p.cancels[keyOf(req.ProcessID, req.SecretKey)]
				p.mu.Unlock()
				p.routed.Add(1)
				return known
			},
		},
	})
	p.ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.port = p.ln.Addr().(*net.TCPAddr).Port
	p.accept.Add(1)
	go func() {
		defer p.accept.Done()
		var id uint64
		for {
			c, err := p.ln.Accept()
			if err != nil {
				return
			}
			id++
			h := tlsproxy.Handoff{Conn: c, ID: id, Addr: c.RemoteAddr().String()}
			if s.asLoop {
				// Enough for this test's clients; the real loop parses properly.
				first := make([]byte, 8)
				n, err := c.Read(first)
				if err != nil {
					c.Close()
					continue
				}
				if first[0] == 0x16 {
					h.StartTLS, h.Direct, h.ReadAhead = true, true, first[:n]
				} else if _, err := io.ReadFull(c, first[n:]); err == nil && bytes.Equal(first, proto.Append(nil, &pgproto3.SSLRequest{})) {
					h.StartTLS, h.Reply = true, []byte{'S'}
				} else {
					c.Close()
					continue
				}
			}
			p.d.Serve(h, func() { p.done.Add(1) })
		}
	}()
	t.Cleanup(p.close)
	return p
}

func (p *proxy) close() {
	p.closeOnce.Do(func() {
		p.ln.Close()
		p.accept.Wait()
		p.d.Close()
		if p.t.Failed() || testing.Verbose() {
			p.t.Logf("proxy log:\n%s", p.logs.String())
		}
		if strings.Contains(p.logs.String(), goodCode) {
			p.t.Errorf("the proxy log contains an MFA code")
		}
	})
}

// psql runs psql against the proxy and returns its combined output.
func (p *proxy) psql(conninfo string, env []string, sql string) (string, error) {
	bin := filepath.Join(plainOrSSLBinDir(), "psql")
	if _, err := os.Stat(bin); err != nil {
		bin = "psql"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql,
		fmt.Sprintf("host=localhost hostaddr=127.0.0.1 port=%d dbname=postgres %s", p.port, conninfo))
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func plainOrSSLBinDir() string {
	for _, c := range []*pgcluster.Cluster{plainPG.Started(), sslPG.Started()} {
		if c != nil {
			return c.BinDir
		}
	}
	return ""
}

// pgxConfig is a pgx configuration for alice through the proxy; extra is
// appended to the connection string.
func (p *proxy) pgxConfig(t *testing.T, extra string) *pgx.ConnConfig {
	t.Helper()
	cfg, err := pgx.ParseConfig(fmt.Sprintf("host=localhost port=%d user=alice password=%s dbname=postgres connect_timeout=60 %s",
		p.port, alicePW, extra))
	if err != nil {
		t.Fatal(err)
	}
	cfg.LookupFunc = func(context.Context, string) ([]string, error) { return []string{"127.0.0.1"}, nil }
	cfg.RuntimeParams["pgmfa.code"] = goodCode
	return cfg
}

// waitActive polls until the driver runs n connections.
func (p *proxy) waitActive(t *testing.T, n int) {
	t.Helper()
	for i := 0; p.d.Active() != n; i++ {
		if i > 1000 {
			t.Fatalf("%d connections active, want %d", p.d.Active(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitLog polls the proxy log for a line containing every part.
func (p *proxy) waitLog(t *testing.T, parts ...string) string {
	t.Helper()
	for i := 0; i < 1000; i++ {
		for _, line := range strings.Split(p.logs.String(), "\n") {
			all := true
			for _, part := range parts {
				all = all && strings.Contains(line, part)
			}
			if all {
				return line
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no log line with %q", parts)
	return ""
}
