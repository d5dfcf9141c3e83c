package loop_test

import (
	"context"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmfa/pgmfa/mfa"
)

// TestLoginTiming: every login through a real PostgreSQL writes one "login
// timing" debug line whose steps all happened and follow one another (they
// add up to the total), for a code claimed in the store and for a later
// login inside the remember window that sends the same code (decided on
// the event loop, without the store).
func TestLoginTiming(t *testing.T) {
	p := startProxy(t, mfa.Options{Remember: time.Minute}, nil)
	code := p.code(alice)
	for i := 0; i < 2; i++ {
		conn, err := pgx.Connect(context.Background(), p.dsn(alice, alicePW, "app", code))
		if err != nil {
			t.Fatalf("login %d: %v", i+1, err)
		}
		conn.Close(context.Background())
	}
	var lines []string
	if !eventually(5*time.Second, func() bool {
		lines = nil
		for _, l := range strings.Split(p.logs.String(), "\n") {
			if strings.Contains(l, `msg="login timing"`) {
				lines = append(lines, l)
			}
		}
		return len(lines) == 2
	}) {
		t.Fatalf("want 2 login timing lines, got %d:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	if !strings.Contains(p.logs.String(), "mfa=code") || !strings.Contains(p.logs.String(), "mfa=remembered") {
		t.Errorf("want one login by code and one remembered:\n%s", p.logs.String())
	}
	field := regexp.MustCompile(`\b([a-z_]+)_us=(\d+)`)
	spans := []string{"accept_to_loop", "client_startup", "dial", "db_first_auth", "auth_exchange", "mfa", "release"}
	for _, l := range lines {
		us := map[string]int64{}
		for _, m := range field.FindAllStringSubmatch(l, -1) {
			us[m[1]], _ = strconv.ParseInt(m[2], 10, 64)
		}
		var sum int64
		for _, s := range spans {
			v, ok := us[s]
			if !ok {
				t.Errorf("step %s missing: %s", s, l)
			}
			sum += v
		}
		total, ok := us["total"]
		// Each span is truncated to whole microseconds on its own.
		if !ok || sum > total || total-sum > int64(len(spans)) {
			t.Errorf("spans add up to %d µs, total %d µs: %s", sum, total, l)
		}
		if in, ok := us["in_loop"]; !ok || in > total+us["splice"] || in == 0 {
			t.Errorf("in_loop %d µs is not within the login (total %d µs, then splice %d µs): %s", in, total, us["splice"], l)
		}
		if _, ok := us["splice"]; !ok {
			t.Errorf("step splice missing: %s", l)
		}
		// The database's part of a login (a backend fork and SCRAM) is
		// never free: a missed stamp would make its span zero or absent.
		if us["db_first_auth"] == 0 || us["auth_exchange"] == 0 {
			t.Errorf("database steps not stamped: %s", l)
		}
	}
}
