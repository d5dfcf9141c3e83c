package loop_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
)

// TestProtocol32BadInput: a database or client that breaks the rules
// protocol 3.2 added ends its own connection, with a log line naming the
// problem, and the proxy goes on serving. The fake database behaves by the
// application_name the client sends: "bad-key" answers with a
// BackendKeyData secret of 257 bytes (3.2 allows up to 256), "bad-npv" with a
// NegotiateProtocolVersion naming an option the client never sent, anything
// else logs in (trust) with a 32-byte key.
func TestProtocol32BadInput(t *testing.T) {
	behave := func(startup []byte) []byte {
		msg, _, err := proto.NextStartup(startup)
		if err != nil {
			return proto.Append(nil, proto.Fatal("08P01", err.Error(), ""))
		}
		app, _ := msg.(*proto.StartupMessage).Get("application_name")
		var out []byte
		switch app {
		case "bad-npv":
			out = proto.Append(out, &pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: pgproto3.ProtocolVersion30, UnrecognizedOptions: []string{"_pq_.never_sent"}})
		}
		out = proto.Append(out, &pgproto3.AuthenticationOk{}, &pgproto3.ParameterStatus{Name: "server_version", Value: "18.0"})
		key := bytes.Repeat([]byte{7}, 32)
		if app == "bad-key" {
			key = bytes.Repeat([]byte{7}, 257)
		}
		// pgproto3 refuses to encode a key above 256 bytes; written by hand.
		k := append([]byte{'K', 0, 0, 0, 0, 0, 0, 0x30, 0x39}, key...)
		binary.BigEndian.PutUint32(k[1:], uint32(4+4+len(key)))
		out = append(out, k...)
		return proto.Append(out, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	}
	// The logins below run one at a time, so the packet on db.startup is
	// the one of this script's connection.
	db := startFakeDB(t, func(c net.Conn, db *fakeDB) error {
		if _, err := c.Write(behave(<-db.startup)); err != nil {
			return err
		}
		_, err := io.Copy(io.Discard, c)
		return err
	})
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Upstream = db.ln.Addr().String() })

	login := func(app string) (*rawClient, pgproto3.BackendMessage) {
		c := dialRaw(t, p)
		c.write(proto.Append(nil, &proto.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion32, Params: []proto.StartupParam{
			{Name: "user", Value: svc}, {Name: "database", Value: "app"}, {Name: "application_name", Value: app}}}))
		for {
			m, err := c.next()
			if err != nil {
				return c, nil
			}
			switch m.(type) {
			case *pgproto3.ErrorResponse, *pgproto3.ReadyForQuery:
				return c, m
			}
		}
	}
	good := func() {
		t.Helper()
		if _, m := login("good"); m == nil {
			t.Fatal("the proxy stopped serving")
		} else if _, ok := m.(*pgproto3.ReadyForQuery); !ok {
			t.Fatalf("a good login got %+v", m)
		}
	}
	good()
	for _, tc := range []struct{ app, log string }{
		{"bad-key", "exceeds 256"},
		{"bad-npv", "never sent"},
	} {
		_, m := login(tc.app)
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			t.Fatalf("%s: the client got a session", tc.app)
		}
		if !eventually(10*time.Second, func() bool { return strings.Contains(p.logs.String(), tc.log) }) {
			t.Fatalf("%s: no log line naming %q:\n%s", tc.app, tc.log, p.logs.String())
		}
		good()
	}

	// CancelRequest of a wrong length: 3.2 keys are 4 to 256 bytes, so a
	// packet is 16 to 268 bytes long (PostgreSQL 18 refuses the rest with
	// "invalid length of cancel request packet").
	for _, n := range []int{15, 269} {
		c := dialRaw(t, p)
		pkt := make([]byte, n)
		binary.BigEndian.PutUint32(pkt, uint32(n))
		binary.BigEndian.PutUint32(pkt[4:], 80877102)
		c.write(pkt)
		if m, err := c.next(); err == nil {
			if _, ok := m.(*pgproto3.ErrorResponse); !ok {
				t.Fatalf("cancel of %d bytes: got %T", n, m)
			}
		}
		if _, err := c.next(); err == nil {
			t.Fatalf("cancel of %d bytes: the connection stayed open", n)
		}
		want := "invalid length of CancelRequest: " + strconv.Itoa(n)
		if !eventually(10*time.Second, func() bool { return strings.Contains(p.logs.String(), want) }) {
			t.Fatalf("no log line naming %q:\n%s", want, p.logs.String())
		}
		good()
	}
}
