package proto

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
)

// TestPassthroughRealPostgres relays a pgx client's SCRAM login to a real
// PostgreSQL through the Passthrough machine. The client must not get
// AuthenticationOk until the test releases it with AppendReady; the MFA code
// in its options must never reach the database.
func TestPassthroughRealPostgres(t *testing.T) {
	c := pg(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port

	type result struct {
		conn *pgx.Conn
		err  error
	}
	connected := make(chan result, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	go func() {
		cfg, err := pgx.ParseConfig(pgcluster.DSN("127.0.0.1", port, "u_scram", pgPassword("u_scram"), "postgres"))
		if err != nil {
			connected <- result{err: err}
			return
		}
		cfg.RuntimeParams["options"] = `-c application_name=pass\ through -c pgmfa.code=123456`
		conn, err := pgx.ConnectConfig(ctx, cfg)
		connected <- result{conn, err}
	}()

	client, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	client.SetDeadline(time.Now().Add(time.Minute))

	// Startup packet: strip the code, forward the rest.
	var buf []byte
	var sm *StartupMessage
	for sm == nil {
		msg, n, err := NextStartup(buf)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			chunk := make([]byte, 1024)
			k, _ := client.Read(chunk)
			if k == 0 {
				t.Fatal("client closed")
			}
			buf = append(buf, chunk[:k]...)
			continue
		}
		buf = buf[n:]
		sm, _ = msg.(*StartupMessage)
	}
	kept, code, err := StripMFA(sm.Params)
	if err != nil || code != "123456" {
		t.Fatalf("code %q err %v", code, err)
	}
	server, err := net.Dial("tcp", c.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	server.SetDeadline(time.Now().Add(time.Minute))
	sm.Params = kept
	server.Write(Append(nil, sm))

	// Relay: the machine decides what crosses. Both sides are read in
	// goroutines; this loop is the only writer.
	type chunk struct {
		fromClient bool
		b          []byte
		err        error
	}
	chunks := make(chan chunk, 16)
	reader := func(conn net.Conn, fromClient bool) {
		for {
			b := make([]byte, 4096)
			n, err := conn.Read(b)
			chunks <- chunk{fromClient, b[:n], err}
			if err != nil {
				return
			}
		}
	}
	go reader(server, false)
	go reader(client, true)
	p := NewPassthroughFor(0, nil)
	cbuf, sbuf := buf, []byte(nil)
	var toClient []byte // everything the client got before the release
	for !p.Ready() {
		ch := <-chunks
		if ch.err != nil && len(ch.b) == 0 {
			t.Fatalf("connection ended during login (client=%v): %v", ch.fromClient, ch.err)
		}
		if ch.fromClient {
			cbuf = append(cbuf, ch.b...)
			for {
				m, n, err := NextMessage(cbuf, 0)
				if err != nil {
					t.Fatal(err)
				}
				if n == 0 {
					break
				}
				cbuf = cbuf[n:]
				out, err := p.FromClient(m)
				if err != nil {
					t.Fatalf("client message %q refused: %v", m.Type, err)
				}
				server.Write(out)
			}
			continue
		}
		sbuf = append(sbuf, ch.b...)
		for !p.Ready() {
			m, n, err := NextMessage(sbuf, 0)
			if err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				break
			}
			sbuf = sbuf[n:]
			out, err := p.FromServer(m)
			if err != nil {
				t.Fatalf("server message %q: %v", m.Type, err)
			}
			toClient = append(toClient, out...)
			client.Write(out)
		}
	}

	// Held: the client saw no AuthenticationOk and is still connecting.
	for b := toClient; len(b) > 0; {
		m, n, _ := NextMessage(b, 0)
		b = b[n:]
		if m.Type == 'R' && len(m.Body) == 4 && m.Body[3] == 0 {
			t.Fatal("AuthenticationOk reached the client before the release")
		}
		if m.Type != 'R' {
			t.Fatalf("message %q reached the client before the release", m.Type)
		}
	}
	select {
	case r := <-connected:
		t.Fatalf("client connected before the release: %v", r.err)
	default:
	}
	res := p.Result()
	if res.Method != "scram-sha-256" || res.Key == nil || res.TxStatus != 'I' {
		t.Fatalf("result %+v", res)
	}

	// Release with the proxy's own key, then splice.
	proxyKey := &pgproto3.BackendKeyData{ProcessID: 777, SecretKey: []byte{7, 7, 7, 7}}
	client.Write(res.AppendReady(nil, proxyKey))
	client.SetDeadline(time.Time{})
	server.SetDeadline(time.Time{})
	go func() {
		// The reader goroutines keep reading; forward what they deliver.
		for ch := range chunks {
			if ch.fromClient {
				server.Write(ch.b)
			} else {
				client.Write(ch.b)
			}
			if ch.err != nil {
				if ch.fromClient {
					server.Close()
				} else {
					client.Close()
				}
			}
		}
	}()
	if len(cbuf) > 0 {
		server.Write(cbuf)
	}
	r := <-connected
	if r.err != nil {
		t.Fatalf("pgx after release: %v", r.err)
	}
	defer r.conn.Close(ctx)
	if r.conn.PgConn().PID() != 777 {
		t.Errorf("client got PID %d, want the proxy's 777", r.conn.PgConn().PID())
	}
	var app string
	var mfa *string
	if err := r.conn.QueryRow(ctx, "SELECT current_setting('application_name'), current_setting('pgmfa.code', true)").Scan(&app, &mfa); err != nil {
		t.Fatal(err)
	}
	if app != "pass through" || mfa != nil {
		t.Fatalf("application_name %q, pgmfa.code %v: the options were not forwarded intact without the code", app, mfa)
	}
}

// TestPassthroughRefusesEarlyQuery relays a SCRAM login whose "client" (an
// UpstreamLogin, driven in-process) sends a Query before the release: the
// machine refuses it and it never reaches the server (checked in the
// server's statement log).
func TestPassthroughRefusesEarlyQuery(t *testing.T) {
	c := pg(t)
	server, err := net.Dial("tcp", c.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	server.SetDeadline(time.Now().Add(time.Minute))
	nonce := make([]byte, 8)
	io.ReadFull(crand.Reader, nonce)
	canary := "pgmfa_canary_" + hex.EncodeToString(nonce)
	early := Message{Type: 'Q', Body: []byte("SELECT '" + canary + "'\x00")}

	cli := NewUpstreamLogin(UpstreamConfig{User: "u_scram", Database: "postgres", Password: pgPassword("u_scram"), Rand: crand.Reader})
	p := NewPassthroughFor(0, nil)
	server.Write(cli.Start())
	r := &msgReader{conn: server}
	for !p.Ready() {
		m, err := r.next()
		if err != nil {
			t.Fatal(err)
		}
		toClient, err := p.FromServer(m)
		if err != nil {
			t.Fatal(err)
		}
		for len(toClient) > 0 {
			cm, n, _ := NextMessage(toClient, 0)
			toClient = toClient[n:]
			bm, err := DecodeBackend(cm)
			if err != nil {
				t.Fatal(err)
			}
			out, _, err := cli.Handle(bm)
			if err != nil {
				t.Fatal(err)
			}
			if out == nil {
				continue
			}
			// The client pipelines a query behind its auth response.
			if _, err := p.FromClient(early); err == nil {
				t.Fatal("Query accepted during authentication")
			}
			rm, _, _ := NextMessage(out, 0)
			toServer, err := p.FromClient(rm)
			if err != nil {
				t.Fatal(err)
			}
			server.Write(toServer)
		}
		if p.Authenticated() {
			if _, err := p.FromClient(early); err == nil {
				t.Fatal("Query accepted after AuthenticationOk, before the release")
			}
		}
	}
	// Released: a marker query goes through, then the log must show the
	// marker and not the canary.
	marker := canary + "_after_release"
	server.Write(Append(nil, &pgproto3.Query{String: "SELECT '" + marker + "'"}))
	for {
		m, err := r.next()
		if err != nil {
			t.Fatal(err)
		}
		if m.Type == 'Z' {
			break
		}
		if m.Type == 'E' {
			t.Fatal("marker query failed")
		}
	}
	log := c.Log()
	if !strings.Contains(log, marker) {
		t.Fatal("statement log does not show the marker query; cannot judge")
	}
	if strings.Contains(strings.ReplaceAll(log, marker, ""), canary) {
		t.Fatal("the early query reached the server")
	}
	var pe *ProtocolError
	if _, err := p.FromClient(early); !errors.As(err, &pe) {
		t.Fatalf("after ready: %v", err)
	}
}
