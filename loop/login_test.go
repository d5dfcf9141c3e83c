package loop_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

// TestPsqlWithCode: the documented way in — a code in PGOPTIONS — works,
// and the session is a real database session.
func TestPsqlWithCode(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	out, stderr, err := p.psql(alice, alicePW, p.code(alice), "select current_user || '@' || current_database()")
	if err != nil {
		t.Fatalf("psql: %v\n%s", err, stderr)
	}
	if out != "alice@app" {
		t.Fatalf("got %q", out)
	}
	if !strings.Contains(p.logs.String(), "result=ok") || !strings.Contains(p.logs.String(), "mfa=code") {
		t.Fatalf("no audit line for the login:\n%s", p.logs.String())
	}
	if strings.Contains(p.logs.String(), p.code(alice)) {
		t.Fatalf("the log contains the MFA code")
	}
}

// TestWrongCodeLeavesNoSession: a wrong code is FATAL 28000 with a HINT,
// and the database session that passed the password step is gone.
func TestWrongCodeLeavesNoSession(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	wrong := "000000"
	if wrong == p.code(alice) {
		wrong = "111111"
	}
	_, stderr, err := p.psql(alice, alicePW, wrong, "select 1")
	if err == nil {
		t.Fatal("login with a wrong code succeeded")
	}
	if !strings.Contains(stderr, "FATAL") || !strings.Contains(stderr, "HINT") {
		t.Fatalf("want FATAL with HINT, got:\n%s", stderr)
	}
	// Through pgx, the SQLSTATE.
	_, err = pgx.Connect(context.Background(), p.dsn(alice, alicePW, "app", wrong))
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "28000" || pgErr.Hint == "" {
		t.Fatalf("pgx: want 28000 with a hint, got %v", err)
	}
	if !eventually(5*time.Second, func() bool { return backends(t, p.pg, alice) == 0 }) {
		t.Fatalf("%d database sessions of %s left after refused logins", backends(t, p.pg, alice), alice)
	}
}

// TestCodeIsSingleUse: RFC 6238 §5.2 — the same code is accepted once.
func TestCodeIsSingleUse(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	code := p.code(alice)
	if _, stderr, err := p.psql(alice, alicePW, code, "select 1"); err != nil {
		t.Fatalf("first use: %v\n%s", err, stderr)
	}
	_, stderr, err := p.psql(alice, alicePW, code, "select 1")
	if err == nil {
		t.Fatal("the same code was accepted twice")
	}
	if !strings.Contains(stderr, "FATAL") {
		t.Fatalf("second use: %s", stderr)
	}
}

// TestApproveOutOfBand: no code, then `pgmfa approve` releases the login.
func TestApproveOutOfBand(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	type result struct {
		out, stderr string
		err         error
	}
	done := make(chan result, 1)
	go func() {
		out, stderr, err := p.psql(alice, alicePW, "", "select 'approved'")
		done <- result{out, stderr, err}
	}()
	if !eventually(10*time.Second, func() bool { return len(p.appr.List()) == 1 }) {
		t.Fatal("the login never started waiting for approval")
	}
	// Nothing reached the client yet, and nothing the client could send went
	// through: it is still waiting.
	select {
	case r := <-done:
		t.Fatalf("login finished before approval: %+v", r)
	default:
	}
	r := p.appr.Approve(mfa.Approval{User: alice, Code: p.code(alice)})
	if !r.OK || len(r.Released) != 1 {
		t.Fatalf("approve: %+v", r)
	}
	res := <-done
	if res.err != nil || res.out != "approved" {
		t.Fatalf("after approval: %q %v\n%s", res.out, res.err, res.stderr)
	}
	if !strings.Contains(p.logs.String(), "mfa=approval") {
		t.Fatal("audit line does not say the login was approved out of band")
	}
}

// TestNoCodeTimesOut: no code and no approval → 28000 after --mfa-timeout.
func TestNoCodeTimesOut(t *testing.T) {
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.MFATimeout = 700 * time.Millisecond })
	_, err := pgx.Connect(context.Background(), p.dsn(alice, alicePW, "app", ""))
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "28000" || !strings.Contains(pgErr.Hint, "pgmfa approve") {
		t.Fatalf("want 28000 with a hint naming pgmfa approve, got %v", err)
	}
	if !eventually(5*time.Second, func() bool { return backends(t, p.pg, alice) == 0 }) {
		t.Fatal("database session left after the MFA timeout")
	}
}

// TestNotEnrolled: a user with no secret is refused with a HINT on how to
// enroll — after the password, so the answer tells an attacker nothing.
func TestNotEnrolled(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	_, err := pgx.Connect(context.Background(), p.dsn(nobody, nobodyPW, "app", "123456"))
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "28000" || !strings.Contains(pgErr.Hint, "pgmfa enroll") {
		t.Fatalf("want 28000 with an enroll hint, got %v", err)
	}
	// A wrong password is the database's 28P01, whatever the MFA state.
	_, err = pgx.Connect(context.Background(), p.dsn(nobody, "wrong", "app", "123456"))
	if !errors.As(err, &pgErr) || pgErr.Code != "28P01" {
		t.Fatalf("wrong password: want 28P01, got %v", err)
	}
}

// TestExemptUser: --mfa-exempt lets a service account in on its password.
func TestExemptUser(t *testing.T) {
	p := startProxy(t, mfa.Options{}, nil)
	conn, err := pgx.Connect(context.Background(), p.dsn(svc, svcPW, "app", ""))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(context.Background(), "select 41 + 1").Scan(&n); err != nil || n != 42 {
		t.Fatalf("query: %d %v", n, err)
	}
}

// TestAuthPasswordWithPgx: --auth password, the code appended to the
// password, a real pgx client; md5 and scram users upstream.
func TestAuthPasswordWithPgx(t *testing.T) {
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) {
		c.Auth = session.AuthPassword
		c.AllowCleartextPassword = true
	})
	ctx := context.Background()
	for _, u := range []struct{ user, pw string }{{alice, alicePW}, {bob, bobPW}} {
		conn, err := pgx.Connect(ctx, p.dsn(u.user, u.pw+p.code(u.user), "app", ""))
		if err != nil {
			t.Fatalf("%s: %v", u.user, err)
		}
		var who string
		if err := conn.QueryRow(ctx, "select current_user").Scan(&who); err != nil || who != u.user {
			t.Fatalf("%s: current_user %q %v", u.user, who, err)
		}
		conn.Close(ctx)
	}
	// A wrong password (right code) is the database's refusal.
	_, err := pgx.Connect(ctx, p.dsn(bob, "nope"+p.code(bob), "app", ""))
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "28P01" {
		t.Fatalf("wrong password: want 28P01, got %v", err)
	}
}

// TestAuthPasswordRefusesPlaintext: without --allow-cleartext-password the
// proxy will not ask for a cleartext password on a plaintext connection.
func TestAuthPasswordRefusesPlaintext(t *testing.T) {
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Auth = session.AuthPassword })
	_, err := pgx.Connect(context.Background(), p.dsn(alice, alicePW+p.code(alice), "app", ""))
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "28000" || !strings.Contains(pgErr.Hint, "--allow-cleartext-password") {
		t.Fatalf("want 28000 naming the flag, got %v", err)
	}
}

// TestRememberPool: with --mfa-remember, a pool opening many connections at
// once with one code gets all of them.
func TestRememberPool(t *testing.T) {
	p := startProxy(t, mfa.Options{Remember: time.Minute}, nil)
	code := p.code(alice)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := pgx.Connect(context.Background(), p.dsn(alice, alicePW, "app", code))
			if err != nil {
				errs <- err
				return
			}
			conn.Close(context.Background())
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("pool connection refused: %v", err)
	}
	// And later ones without any code.
	conn, err := pgx.Connect(context.Background(), p.dsn(alice, alicePW, "app", ""))
	if err != nil {
		t.Fatalf("remembered login without a code: %v", err)
	}
	conn.Close(context.Background())
}

// TestMaxConnsAndUnreachableUpstream: past --max-conns a client gets 53300;
// a database that cannot be reached is 08006 naming its address.
func TestMaxConnsAndUnreachableUpstream(t *testing.T) {
	ctx := context.Background()
	p := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.MaxConns = 1 })
	held, err := pgx.Connect(ctx, p.dsn(svc, svcPW, "app", ""))
	if err != nil {
		t.Fatal(err)
	}
	_, err = pgx.Connect(ctx, p.dsn(svc, svcPW, "app", ""))
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "53300" {
		t.Fatalf("second connection with --max-conns 1: want 53300, got %v", err)
	}
	held.Close(ctx)
	// The slot comes back when the session ends.
	if !eventually(10*time.Second, func() bool {
		c, err := pgx.Connect(ctx, p.dsn(svc, svcPW, "app", ""))
		if err == nil {
			c.Close(ctx)
		}
		return err == nil
	}) {
		t.Fatal("the connection slot was not given back")
	}

	dead := startProxy(t, mfa.Options{}, func(c *loop.Config) { c.Upstream = "127.0.0.1:1" })
	_, err = pgx.Connect(ctx, dead.dsn(svc, svcPW, "app", ""))
	if !errors.As(err, &pgErr) || pgErr.Code != "08006" || !strings.Contains(pgErr.Message, "127.0.0.1:1") {
		t.Fatalf("unreachable upstream: want 08006 naming 127.0.0.1:1, got %v", err)
	}
}
