package pgcluster_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	. "github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
)

// TestMethods starts one cluster with per-user pg_hba rules and checks that
// each user logs in over TCP with its method and is refused with a wrong
// password.
func TestMethods(t *testing.T) {
	c := pgtest.Start(t, Options{
		Method: ScramSHA256,
		Users: []User{
			{Name: "u_trust", Method: Trust},
			{Name: "u_password", Password: "pw1", Method: Password},
			{Name: "u_md5", Password: "pw2", Method: MD5},
			{Name: "u_scram", Password: "pw3"},
		},
		Databases: []string{"appdb"},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, tc := range []struct{ user, pw string }{
		{"u_trust", ""}, {"u_password", "pw1"}, {"u_md5", "pw2"}, {"u_scram", "pw3"},
	} {
		conn, err := pgx.Connect(ctx, c.DSN(tc.user, tc.pw, "appdb"))
		if err != nil {
			t.Fatalf("%s: connect: %v", tc.user, err)
		}
		var who string
		if err := conn.QueryRow(ctx, "select current_user").Scan(&who); err != nil || who != tc.user {
			t.Fatalf("%s: current_user = %q, %v", tc.user, who, err)
		}
		conn.Close(ctx)
		if tc.pw != "" {
			_, err := pgx.Connect(ctx, c.DSN(tc.user, "wrong", "appdb"))
			if err == nil || !strings.Contains(err.Error(), "28P01") {
				t.Fatalf("%s: wrong password: err = %v, want 28P01", tc.user, err)
			}
		}
	}
	out, err := c.Psql("select rolpassword like 'md5%' from pg_authid where rolname = 'u_md5'")
	if err != nil || out != "t" {
		t.Fatalf("u_md5 should have an md5 verifier: %q %v", out, err)
	}
}
