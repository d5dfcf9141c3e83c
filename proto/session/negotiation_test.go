package session

import (
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/proto"
)

// TestOneNegotiationRequestOfEach: PostgreSQL answers one SSLRequest and one
// GSSENCRequest per connection; a repeated one is an unsupported protocol
// version to it (0A000). An endless stream of them must not be answered
// endlessly (each answer is buffered for a client that may never read).
func TestOneNegotiationRequestOfEach(t *testing.T) {
	refused := func(t *testing.T, out Output) {
		t.Helper()
		var ae *proto.AuthError
		if !out.Close || !errors.As(out.Err, &ae) || ae.Code != "0A000" || !strings.Contains(ae.Message, "unsupported frontend protocol") {
			t.Fatalf("want a 0A000 refusal and close, got %+v", out)
		}
		if e := proto.ErrorFor(out.Err); e.Code != "0A000" {
			t.Fatalf("client gets %+v", e)
		}
	}
	for _, tc := range []struct {
		name string
		seq  []pgproto3.FrontendMessage
	}{
		{"SSL twice", []pgproto3.FrontendMessage{&pgproto3.SSLRequest{}, &pgproto3.SSLRequest{}}},
		{"GSS twice", []pgproto3.FrontendMessage{&pgproto3.GSSEncRequest{}, &pgproto3.GSSEncRequest{}}},
		{"SSL GSS SSL", []pgproto3.FrontendMessage{&pgproto3.SSLRequest{}, &pgproto3.GSSEncRequest{}, &pgproto3.SSLRequest{}}},
		{"GSS SSL GSS", []pgproto3.FrontendMessage{&pgproto3.GSSEncRequest{}, &pgproto3.SSLRequest{}, &pgproto3.GSSEncRequest{}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := New(Config{})
			for i, msg := range tc.seq {
				n, out := m.FromClient(enc(msg))
				if i < len(tc.seq)-1 {
					if n != 8 || string(out.ToClient) != "N" || out.Close {
						t.Fatalf("request %d: %d %+v", i+1, n, out)
					}
					continue
				}
				refused(t, out)
			}
		})
	}
	// Inside TLS, a GSSENCRequest is refused as PostgreSQL refuses it.
	m := New(Config{TLS: TLSAllow})
	if _, out := m.FromClient(enc(&pgproto3.SSLRequest{})); !out.StartTLS {
		t.Fatal("no StartTLS")
	}
	m.SetEncrypted()
	_, out := m.FromClient(enc(&pgproto3.GSSEncRequest{}))
	refused(t, out)
}
