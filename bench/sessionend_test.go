package main

import (
	"bytes"
	"log/slog"
	"testing"
	"time"
)

// TestSessionEndReason reads lines written by slog's own handlers, as
// pgmfa writes them with --log-format text and json.
func TestSessionEndReason(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		var buf bytes.Buffer
		var h slog.Handler = slog.NewTextHandler(&buf, nil)
		if format == "json" {
			h = slog.NewJSONHandler(&buf, nil)
		}
		log := slog.New(h)
		log.Info("login", "conn", 7, "client", "127.0.0.1:40001", "result", "ok")
		log.Info("session end", "conn", 6, "client", "127.0.0.1:40000", "mode", "sockmap", "duration", time.Second, "reason", "client closed")
		log.Warn("spliced session ended: a direction reached the kernel backlog bound (its reader is too slow or stopped)", "from", "127.0.0.1:40001", "backlog", 67108864)
		log.Info("session end", "conn", 7, "client", "127.0.0.1:40001", "user", "bench", "mode", "sockmap",
			"bytes_client_to_server", uint64(123), "duration", 1500*time.Millisecond, "reason", "backlog limit")

		if got, ok := sessionEndReason(buf.String(), "127.0.0.1:40001"); !ok || got != "backlog limit" {
			t.Errorf("%s: reason %q, %v; want backlog limit\n%s", format, got, ok, buf.String())
		}
		if got, ok := sessionEndReason(buf.String(), "127.0.0.1:40000"); !ok || got != "client closed" {
			t.Errorf("%s: reason %q, %v; want client closed", format, got, ok)
		}
		if got, ok := sessionEndReason(buf.String(), "127.0.0.1:4000"); ok {
			t.Errorf("%s: a client that had no session end line got %q", format, got)
		}
	}
}

func TestLogFields(t *testing.T) {
	cases := map[string]map[string]string{
		`a=1 b="two words" c= d="q\"uote"`: {"a": "1", "b": "two words", "c": "", "d": `q"uote`},
		`  x=y  `:                          {"x": "y"},
		`x=1 broken "quote`:                {"x": "1"},
		`x="unterminated`:                  {},
		`{"msg":"m","n":3}`:                {"msg": "m", "n": "3"},
		`{not json`:                        {},
		``:                                 {},
	}
	for line, want := range cases {
		got := logFields(line)
		if len(got) != len(want) {
			t.Errorf("logFields(%q) = %v, want %v", line, got, want)
			continue
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("logFields(%q)[%s] = %q, want %q", line, k, got[k], v)
			}
		}
	}
}
