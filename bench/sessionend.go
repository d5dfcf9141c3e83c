package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// sessionEndWait is how long a failed measurement waits for pgmfa to log
// the end of its session (the client may see the broken connection first).
const sessionEndWait = 3 * time.Second

// sessionEndWatch returns a function that reports the reason pgmfa logged
// for ending conn's session, "" when it logged none within sessionEndWait
// (or the path is not pgmfa). It reads only what the log gained after the
// call to sessionEndWatch.
func sessionEndWatch(ep *endpoint, conn *pgconn.PgConn) func() string {
	if !isPgmfa(ep.Name) || ep.LogFile == "" {
		return func() string { return "" }
	}
	var from int64
	if fi, err := os.Stat(ep.LogFile); err == nil {
		from = fi.Size()
	}
	client := conn.Conn().LocalAddr().String()
	return func() string {
		deadline := time.Now().Add(sessionEndWait)
		for {
			if reason, ok := sessionEndReason(readFrom(ep.LogFile, from), client); ok {
				return reason
			}
			if time.Now().After(deadline) {
				return ""
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// readFrom returns a file's content from offset on ("" on any error).
func readFrom(path string, offset int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	b, _ := io.ReadAll(io.NewSectionReader(f, offset, 1<<40))
	return string(b)
}

// sessionEndReason finds pgmfa's "session end" line for the client address
// in log (text or JSON, as --log-format makes them) and returns its reason.
func sessionEndReason(log, client string) (string, bool) {
	for _, line := range strings.Split(log, "\n") {
		f := logFields(line)
		if f["msg"] == "session end" && f["client"] == client {
			return f["reason"], true
		}
	}
	return "", false
}

// logFields splits one log/slog line into its attributes: a JSON object,
// or key=value pairs with Go-quoted values where they need quotes. A line
// that is neither yields what could be read before the damage.
func logFields(line string) map[string]string {
	out := map[string]string{}
	line = strings.TrimSpace(line)
	if strings.HasPrefix(line, "{") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil {
			for k, v := range m {
				if s, ok := v.(string); ok {
					out[k] = s
				} else {
					out[k] = fmt.Sprint(v)
				}
			}
		}
		return out
	}
	for line != "" {
		eq := strings.IndexByte(line, '=')
		if eq <= 0 || strings.ContainsAny(line[:eq], " \"") {
			return out
		}
		key, rest := line[:eq], line[eq+1:]
		var val string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				return out
			}
			val, _ = strconv.Unquote(q)
			rest = rest[len(q):]
		} else if sp := strings.IndexByte(rest, ' '); sp >= 0 {
			val, rest = rest[:sp], rest[sp:]
		} else {
			val, rest = rest, ""
		}
		out[key] = val
		line = strings.TrimLeft(rest, " ")
	}
	return out
}
