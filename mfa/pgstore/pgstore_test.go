package pgstore_test

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/bench/pgcluster"
	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/mfa/pgstore"
)

// The tests share one cluster; each uses its own schema, so they do not see
// each other's rows.
var (
	clusterOnce sync.Once
	cluster     *pgcluster.Cluster
	clusterErr  error
)

func startCluster(t *testing.T) *pgcluster.Cluster {
	t.Helper()
	clusterOnce.Do(func() {
		cluster, clusterErr = pgcluster.Start(pgcluster.Options{
			Users: []pgcluster.User{{Name: "proxy", Password: "proxy"}},
		})
	})
	pgtest.Check(t, clusterErr)
	return cluster
}

func TestMain(m *testing.M) {
	code := m.Run()
	if cluster != nil {
		_ = cluster.Stop()
	}
	os.Exit(code)
}

var schemaN atomic.Int64

// open inits a fresh schema as the superuser and returns a store on it.
func open(t *testing.T, keys *mfa.Keyring) (*pgstore.Store, pgstore.Options) {
	t.Helper()
	c := startCluster(t)
	opts := pgstore.Options{Keys: keys, Schema: "t" + strings.ToLower(strings.ReplaceAll(t.Name(), "/", "_")) + "_" + itoa(schemaN.Add(1))}
	s, err := pgstore.Open(c.DSN(pgcluster.Superuser, "postgres", "postgres"), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if _, _, err := s.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	return s, opts
}

// another opens a second store on the same schema, as a second proxy
// would (its own pool); closed at the test's end.
func another(t *testing.T, opts pgstore.Options) *pgstore.Store {
	t.Helper()
	s, err := pgstore.Open(startCluster(t).DSN(pgcluster.Superuser, "postgres", "postgres"), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func keyring(t *testing.T, n int) (*mfa.Keyring, string) {
	t.Helper()
	var lines []string
	for i := 0; i < n; i++ {
		k, err := mfa.NewKeyText()
		if err != nil {
			t.Fatal(err)
		}
		lines = append(lines, k)
	}
	text := strings.Join(lines, "\n")
	kr, err := mfa.ParseKeyring(text)
	if err != nil {
		t.Fatal(err)
	}
	return kr, text
}

func TestInitIsIdempotentAndVersioned(t *testing.T) {
	s, _ := open(t, nil)
	from, to, err := s.Init(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if from != to || to < 1 {
		t.Fatalf("second init: from %d to %d, want no change", from, to)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	// A schema that does not exist is named, with the command that fixes it.
	c := startCluster(t)
	empty, err := pgstore.Open(c.DSN(pgcluster.Superuser, "postgres", "postgres"), pgstore.Options{Schema: "nothing_here"})
	if err != nil {
		t.Fatal(err)
	}
	defer empty.Close()
	if err := empty.Check(); err == nil || !strings.Contains(err.Error(), "pgmfa store init") {
		t.Fatalf("check of a missing schema: %v", err)
	}
}

func TestMalformedConnectionString(t *testing.T) {
	_, err := pgstore.Open("postgres://user@host:notaport/db", pgstore.Options{})
	if err == nil || !strings.Contains(err.Error(), "not a valid PostgreSQL connection string") {
		t.Fatalf("got %v", err)
	}
	for _, s := range []string{"postgres://x", "postgresql://x", "host=db dbname=mfa"} {
		if !pgstore.IsURL(s) {
			t.Errorf("IsURL(%q) = false", s)
		}
	}
	for _, s := range []string{"/var/lib/pgmfa/totp.json", "totp.json", "./a=b/store.json"} {
		if pgstore.IsURL(s) {
			t.Errorf("IsURL(%q) = true", s)
		}
	}
}

// Fifty claims of one step from two stores (two pools, as two proxies
// have): exactly one wins.
func TestClaimStepIsSingleUseAcrossStores(t *testing.T) {
	a, opts := open(t, nil)
	if _, err := a.Enroll("alice", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	b := another(t, opts)
	acct, ok, err := a.LoadAccount("alice")
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	var wins atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok, err := s.ClaimStep("alice", 1_800_000_000, acct.Secret)
			if err != nil {
				t.Error(err)
			}
			if ok {
				wins.Add(1)
			}
		}()
	}
	wg.Wait()
	if wins.Load() != 1 {
		t.Fatalf("%d claims of one step won, want 1", wins.Load())
	}
	// An older step loses; a newer one wins; another secret is refused.
	if ok, _ := b.ClaimStep("alice", 1_799_999_970, acct.Secret); ok {
		t.Fatal("an older step was claimed")
	}
	if ok, err := b.ClaimStep("alice", 1_800_000_030, acct.Secret); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if _, err := b.ClaimStep("alice", 1_800_000_060, "JBSWY3DPEHPK3PXP"); !errors.Is(err, mfa.ErrSecretChanged) {
		t.Fatalf("claim with another secret: %v", err)
	}
	if _, err := b.ClaimStep("bob", 1_800_000_060, acct.Secret); !errors.Is(err, mfa.ErrNotEnrolled) {
		t.Fatalf("claim of a user not enrolled: %v", err)
	}
}

// Two Guards over two stores (two proxies): failures counted by one
// throttle the other, a code accepted by one is a replay on the other, and
// a remember grant made by one admits on the other.
func TestGuardsShareThrottleSingleUseAndRemember(t *testing.T) {
	kr, _ := keyring(t, 1)
	a, opts := open(t, kr)
	if _, err := a.Enroll("alice", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	b := another(t, opts)
	mopts := mfa.Options{MaxFailures: 3, Remember: time.Hour}
	ga, gb := mfa.NewGuard(mopts, a), mfa.NewGuard(mopts, b)

	now := time.Now()
	good, err := a.Code("alice", now)
	if err != nil {
		t.Fatal(err)
	}
	bad := "000000"
	if bad == good {
		bad = "111111"
	}
	// Remember: accepted on A, the same code from the same address on B
	// passes by the pool rule, from another address it is a replay.
	if o := ga.Verify("alice", "10.0.0.1:1000", good); !o.OK {
		t.Fatalf("first use on A: %+v", o)
	}
	if o := gb.Verify("alice", "10.0.0.1:2000", good); !o.OK || o.Reason != mfa.ReasonRemembered {
		t.Fatalf("same code, same address, on B: %+v", o)
	}
	if o := gb.Verify("alice", "10.0.0.2:2000", good); o.OK || o.Reason != mfa.ReasonReplayed {
		t.Fatalf("same code, other address, on B: %+v", o)
	}
	if !gb.Remembered("alice", "10.0.0.1:3000") {
		t.Fatal("B does not see A's remember grant")
	}
	if gb.Remembered("alice", "10.0.0.3:3000") {
		t.Fatal("B remembers an address nobody verified from")
	}

	// A success on B forgives the failures counted on A: 2 + 2 failures
	// around it stay under the limit of 3.
	if _, err := a.Enroll("erin", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	erin, _ := a.Code("erin", now)
	for i := 0; i < 2; i++ {
		if o := ga.Verify("erin", "10.0.2.1:1", bad); o.Reason != mfa.ReasonBadCode {
			t.Fatalf("erin's failure %d: %+v", i, o)
		}
	}
	if o := gb.Verify("erin", "10.0.2.1:1", erin); !o.OK {
		t.Fatalf("erin's success on B: %+v", o)
	}
	for i := 0; i < 2; i++ {
		if o := ga.Verify("erin", "10.0.2.1:1", bad); o.Reason != mfa.ReasonBadCode {
			t.Fatalf("erin's failure %d after the success: %+v", i, o)
		}
	}

	// Throttling: 2 failures on A, 1 on B: the user is throttled on both.
	for i, g := range []*mfa.Guard{ga, ga, gb} {
		if o := g.Verify("alice", "10.0.1.1:1", bad); o.Reason != mfa.ReasonBadCode {
			t.Fatalf("failure %d: %+v", i, o)
		}
	}
	for name, g := range map[string]*mfa.Guard{"A": ga, "B": gb} {
		if o := g.Verify("alice", "10.0.1.2:1", good); o.Reason != mfa.ReasonThrottled {
			t.Fatalf("after 3 failures across the fleet, %s: %+v", name, o)
		}
	}
}

// The tables hold no secret in plaintext: a dump of the schema is grepped
// for each secret (base32, any case) after enroll, claim and rotation.
func TestNoPlaintextSecretInTables(t *testing.T) {
	kr, _ := keyring(t, 1)
	s, opts := open(t, kr)
	var secrets []string
	for _, u := range []string{"alice", "bob"} {
		k, err := s.Enroll(u, mfa.EnrollOptions{}, false)
		if err != nil {
			t.Fatal(err)
		}
		secrets = append(secrets, k.Secret())
		g := mfa.NewGuard(mfa.Options{Remember: time.Hour}, s)
		c, _ := s.Code(u, time.Now())
		if o := g.Verify(u, "10.0.0.1:1", c); !o.OK {
			t.Fatal(o)
		}
	}
	if _, err := s.Reseal(); err != nil {
		t.Fatal(err)
	}
	dump, err := startCluster(t).Psql(`SELECT row_to_json(u)::text FROM ` + opts.Schema + `.users u UNION ALL SELECT row_to_json(g)::text FROM ` + opts.Schema + `.grants g`)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(dump, "aes256gcm:"+kr.CurrentID()) {
		t.Fatalf("the dump holds no sealed secret:\n%s", dump)
	}
	for _, sec := range secrets {
		for _, form := range []string{sec, strings.ToLower(sec), sec[:16]} {
			if strings.Contains(dump, form) {
				t.Fatalf("plaintext secret %q found in the tables:\n%s", form, dump)
			}
		}
	}
}

// Wrong, missing and unknown keys and a tampered record each fail with
// an error naming the problem, and a failed rotation writes nothing.
func TestBadKeysAndTampering(t *testing.T) {
	kr, _ := keyring(t, 1)
	s, opts := open(t, kr)
	if _, err := s.Enroll("alice", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	dsn := startCluster(t).DSN(pgcluster.Superuser, "postgres", "postgres")
	with := func(keys *mfa.Keyring) *pgstore.Store {
		o := opts
		o.Keys = keys
		x, err := pgstore.Open(dsn, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(x.Close)
		return x
	}
	if _, _, err := with(nil).LoadAccount("alice"); !errors.Is(err, mfa.ErrNoKey) {
		t.Fatalf("no key: %v", err)
	}
	other, _ := keyring(t, 1)
	_, _, err := with(other).LoadAccount("alice")
	if !errors.Is(err, mfa.ErrUnknownKey) || !strings.Contains(err.Error(), kr.CurrentID()) {
		t.Fatalf("unknown key: %v", err)
	}
	before, err := startCluster(t).Psql(`SELECT secret FROM ` + opts.Schema + `.users WHERE name = 'alice'`)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := with(other).Reseal(); !errors.Is(err, mfa.ErrUnknownKey) {
		t.Fatalf("rotation with the wrong key: %v", err)
	}
	// Tamper: the sealed secret of alice moved onto bob.
	if _, err := s.Enroll("bob", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	if _, err := startCluster(t).Psql(`UPDATE ` + opts.Schema + `.users SET secret = (SELECT secret FROM ` + opts.Schema + `.users WHERE name = 'alice') WHERE name = 'bob'`); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.LoadAccount("bob"); !errors.Is(err, mfa.ErrTampered) {
		t.Fatalf("tampered: %v", err)
	}
	if _, err := s.Reseal(); !errors.Is(err, mfa.ErrTampered) {
		t.Fatalf("rotation over a tampered record: %v", err)
	}
	after, err := startCluster(t).Psql(`SELECT secret FROM ` + opts.Schema + `.users WHERE name = 'alice'`)
	if err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Fatal("a failed rotation changed a record")
	}
	g := mfa.NewGuard(mfa.Options{}, s)
	if o := g.Verify("bob", "10.0.0.1:1", "123456"); o.OK || o.Reason != mfa.ReasonStoreDown {
		t.Fatalf("login of a tampered user: %+v", o)
	}
}

// Rotation: records sealed with the old key are re-sealed with the new one,
// while a store holding both keys reads both throughout.
func TestRotateKey(t *testing.T) {
	old, oldText := keyring(t, 1)
	s, opts := open(t, old)
	if _, err := s.Enroll("alice", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	want, _ := s.Code("alice", time.Unix(1_800_000_000, 0))
	newKey, _ := mfa.NewKeyText()
	both, err := mfa.ParseKeyring(newKey + "\n" + oldText)
	if err != nil {
		t.Fatal(err)
	}
	opts.Keys = both
	r := another(t, opts)
	if n, err := r.Reseal(); err != nil || n != 1 {
		t.Fatal(n, err)
	}
	out, _ := startCluster(t).Psql(`SELECT key_id FROM ` + opts.Schema + `.users`)
	if out != both.CurrentID() {
		t.Fatalf("key id after rotation %q, want %q", out, both.CurrentID())
	}
	if got, err := r.Code("alice", time.Unix(1_800_000_000, 0)); err != nil || got != want {
		t.Fatalf("after rotation: %q %v, want %q", got, err, want)
	}
	if _, err := s.Code("alice", time.Now()); !errors.Is(err, mfa.ErrUnknownKey) {
		t.Fatalf("the old key alone after rotation: %v", err)
	}
}

// The proxy's role gets only what GrantSQL gives: it verifies codes, and
// cannot enroll, read other schemas' objects or change the schema.
func TestLeastPrivilegeRole(t *testing.T) {
	s, opts := open(t, nil)
	if _, err := s.Enroll("alice", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	if err := s.GrantRole(context.Background(), "proxy"); err != nil {
		t.Fatal(err)
	}
	p, err := pgstore.Open(startCluster(t).DSN("proxy", "proxy", "postgres"), opts)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Check(); err != nil {
		t.Fatal(err)
	}
	g := mfa.NewGuard(mfa.Options{Remember: time.Hour, MaxFailures: 2}, p)
	c, _ := p.Code("alice", time.Now())
	if o := g.Verify("alice", "10.0.0.1:1", c); !o.OK {
		t.Fatalf("verify as the proxy's role: %+v", o)
	}
	if o := g.Verify("alice", "10.0.0.1:1", "000000"); o.Reason != mfa.ReasonBadCode && o.Reason != mfa.ReasonReplayed {
		t.Fatalf("failure as the proxy's role: %+v", o)
	}
	if _, err := p.Enroll("mallory", mfa.EnrollOptions{}, false); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("enroll as the proxy's role: %v", err)
	}
	if _, _, err := p.Init(context.Background()); err == nil {
		t.Fatal("the proxy's role could run init")
	}
}

// Approvals over two stores (two proxies): a login waiting on B is listed
// and approved on A; B, not listening at that moment, lets it in when it
// reconciles (as after a lost connection), and never a login whose row
// vanished without a release.
func TestFleetApprovalsReconcile(t *testing.T) {
	a, opts := open(t, nil)
	if _, err := a.Enroll("dave", mfa.EnrollOptions{}, false); err != nil {
		t.Fatal(err)
	}
	b := another(t, opts)
	apA := mfa.NewFleetApprovals(mfa.NewGuard(mfa.Options{}, a), a)
	apB := mfa.NewFleetApprovals(mfa.NewGuard(mfa.Options{}, b), b)

	released := make(chan mfa.Outcome, 2)
	p1, _, _, cancel1 := apB.Wait(mfa.Login{User: "dave", Addr: "10.0.0.1:1"}, func(o mfa.Outcome) { released <- o })
	defer cancel1()
	if ls := apA.List(); len(ls) != 1 || ls[0].ID != p1.ID || ls[0].User != "dave" {
		t.Fatalf("A lists %+v, want B's login %d", ls, p1.ID)
	}
	c, _ := a.Code("dave", time.Now())
	r := apA.Approve(mfa.Approval{User: "dave", Code: c})
	if !r.OK || len(r.Released) != 1 || r.Released[0].ID != p1.ID {
		t.Fatalf("approve on A: %+v", r)
	}
	select {
	case o := <-released:
		t.Fatalf("released without a notification or a reconcile: %+v", o)
	default:
	}
	if err := apB.Reconcile(); err != nil {
		t.Fatal(err)
	}
	select {
	case o := <-released:
		if !o.OK {
			t.Fatalf("release outcome %+v", o)
		}
	default:
		t.Fatal("reconcile did not release the approved login")
	}
	if ls := apA.List(); len(ls) != 0 {
		t.Fatalf("still listed after the release: %+v", ls)
	}

	// A row deleted by hand releases nothing.
	p2, _, _, cancel2 := apB.Wait(mfa.Login{User: "dave", Addr: "10.0.0.2:1"}, func(o mfa.Outcome) { released <- o })
	defer cancel2()
	if err := a.Withdraw(p2.ID); err != nil {
		t.Fatal(err)
	}
	if err := apB.Reconcile(); err != nil {
		t.Fatal(err)
	}
	select {
	case o := <-released:
		t.Fatalf("a vanished row released a login: %+v", o)
	default:
	}
}

// Prune deletes old failures, expired grants and abandoned waiting logins,
// and nothing a decision still reads.
func TestPrune(t *testing.T) {
	s, opts := open(t, nil)
	now := time.Now()
	if err := s.AddFailure([]string{"user:old"}, now.Add(-48*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := s.AddFailure([]string{"user:new"}, now); err != nil {
		t.Fatal(err)
	}
	if err := s.PutGrant("a\x0010.0.0.1", mfa.Grant{Until: now.Add(-48 * time.Hour), SecretTag: "x"}); err != nil {
		t.Fatal(err)
	}
	if err := s.PutGrant("b\x0010.0.0.1", mfa.Grant{Until: now.Add(time.Hour), SecretTag: "x"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Prune(now); err != nil {
		t.Fatal(err)
	}
	out, err := startCluster(t).Psql(`SELECT string_agg(key, ',') FROM ` + opts.Schema + `.failures; SELECT string_agg(name, ',') FROM ` + opts.Schema + `.grants`)
	if err != nil {
		t.Fatal(err)
	}
	if out != "user:new\nb" {
		t.Fatalf("after prune:\n%s", out)
	}
}
