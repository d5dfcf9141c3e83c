package proto

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// TestWriteFuzzSeeds regenerates testdata/fuzz/<Name>/ from hand-picked
// inputs and the captured PostgreSQL logins (PGMFA_WRITE_SEEDS=1).
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("PGMFA_WRITE_SEEDS") == "" {
		t.Skip("set PGMFA_WRITE_SEEDS=1 to regenerate the fuzz seed corpora")
	}
	write := func(target, name string, vals ...any) {
		var b strings.Builder
		b.WriteString("go test fuzz v1\n")
		for _, v := range vals {
			switch v := v.(type) {
			case []byte:
				fmt.Fprintf(&b, "[]byte(%s)\n", strconv.Quote(string(v)))
			case string:
				fmt.Fprintf(&b, "string(%s)\n", strconv.Quote(v))
			case int:
				fmt.Fprintf(&b, "int(%d)\n", v)
			case byte:
				fmt.Fprintf(&b, "byte(%q)\n", rune(v))
			}
		}
		dir := filepath.Join("testdata", "fuzz", target)
		os.MkdirAll(dir, 0o755)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	files, _ := filepath.Glob(filepath.Join("testdata", "login_*.json"))
	for _, f := range files {
		var ex exchange
		b, _ := os.ReadFile(f)
		json.Unmarshal(b, &ex)
		// Server stream as steps (direction byte 0 before each message),
		// interleaved with the client's answers for the passthrough.
		var up, pt []byte
		srv, cli := ex.Server, ex.Client
		for len(srv) > 0 {
			m, n, _ := NextMessage(srv, 0)
			srv = srv[n:]
			up = m.AppendRaw(append(up, 0))
			pt = m.AppendRaw(append(pt, 0))
			if m.Type == 'R' && len(m.Body) >= 4 && (m.Body[3] == authCleartext || m.Body[3] == authMD5 || m.Body[3] == authSASL || m.Body[3] == authSASLCont) && len(cli) > 0 {
				cm, k, _ := NextMessage(cli, 0)
				cli = cli[k:]
				pt = cm.AppendRaw(append(pt, 1))
			}
		}
		name := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(f), "login_"), ".json")
		write("FuzzUpstreamLogin", "pg15_"+name, up)
		write("FuzzPassthrough", "pg15_"+name, pt)
		write("FuzzNextMessage", "pg15_"+name, ex.Server, 0)
	}
	write("FuzzNextStartup", "startup30", startupBytes(t, pgproto3.ProtocolVersion30, map[string]string{"user": "u", "database": "d", "options": "-c pgmfa.code=1"}))
	write("FuzzNextStartup", "startup32", startupBytes(t, pgproto3.ProtocolVersion32, map[string]string{"user": "u"}))
	write("FuzzNextStartup", "ssl", Append(nil, &pgproto3.SSLRequest{}))
	write("FuzzNextStartup", "gssenc", Append(nil, &pgproto3.GSSEncRequest{}))
	write("FuzzNextStartup", "cancel30", Append(nil, &pgproto3.CancelRequest{ProcessID: 1, SecretKey: []byte{1, 2, 3, 4}}))
	write("FuzzNextStartup", "cancel32", Append(nil, &pgproto3.CancelRequest{ProcessID: 1, SecretKey: make([]byte, 32)}))
	write("FuzzNextStartup", "huge_claim", []byte{0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0})
	write("FuzzNextStartup", "dup_user", rawStartup(pgproto3.ProtocolVersion30, "user\x00a\x00user\x00b\x00\x00"))
	write("FuzzNextMessage", "huge_claim", []byte{'p', 0x7f, 0xff, 0xff, 0xff}, 0)
	write("FuzzNextMessage", "short_len", []byte{'p', 0, 0, 0, 3}, 0)
	write("FuzzPassthrough", "plus_only", seedSteps(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256-PLUS"}}))
	write("FuzzPassthrough", "query_after_ok", seedSteps(&pgproto3.AuthenticationOk{}, &pgproto3.Query{String: "SELECT 1"},
		&pgproto3.ParameterStatus{Name: "a", Value: "b"}, &pgproto3.ReadyForQuery{TxStatus: 'I'}))
	write("FuzzPassthrough", "error_after_ok", seedSteps(&pgproto3.AuthenticationOk{}, &pgproto3.ErrorResponse{Code: "57P01"}))
	write("FuzzServerLogin", "scram", byte(3), seedSteps(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte("n,,n=,r=abc")},
		&pgproto3.SASLResponse{Data: []byte("c=biws,r=abcAAAAAAAAAAAAAAAAAAAAAAAA,p=AAAA")}))
	write("FuzzServerLogin", "scram_plus", byte(3), seedSteps(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256-PLUS", Data: []byte("p=tls-server-end-point,,n=,r=abc")}))
	write("FuzzServerLogin", "md5", byte(2), seedSteps(&pgproto3.PasswordMessage{Password: "md5abc"}))
	write("FuzzServerLogin", "cleartext_right", byte(1), seedSteps(&pgproto3.PasswordMessage{Password: "pencil"}))
	write("FuzzServerLogin", "cleartext_unknown", byte(17), seedSteps(&pgproto3.PasswordMessage{Password: "pencil"}))
	write("FuzzStripMFACode", "mixed", `-c a=b -c pgmfa.code=123456 --x=y`, "")
	write("FuzzStripMFACode", "escaped", `-c application_name=a\ b -cpgmfa.code=1 -c\ pgmfa.code=2 \\`, "1")
	write("FuzzStripMFACode", "conflict", "--pgmfa.code=2\t-c PGMFA.CODE=3", "")
	write("FuzzStripMFACode", "dangling", "-c", "")
}
