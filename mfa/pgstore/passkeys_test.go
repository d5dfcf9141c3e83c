package pgstore_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/mfa/pgstore"
)

func tokenHash(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}

func testPasskey(n int) mfa.Passkey {
	return mfa.Passkey{
		ID:        []byte(fmt.Sprintf("credential-%d", n)),
		Data:      []byte(fmt.Sprintf(`{"publicKey":"PUBKEY-%d-do-not-leak"}`, n)),
		SignCount: uint32(n),
	}
}

// enrolled opens a fresh store with alice and bob enrolled, and a second
// store on it (a second instance, its own pool).
func enrolled(t *testing.T, keys *mfa.Keyring) (*pgstore.Store, *pgstore.Store, pgstore.Options) {
	t.Helper()
	a, opts := open(t, keys)
	for _, u := range []string{"alice", "bob"} {
		if _, err := a.Enroll(u, mfa.EnrollOptions{}, false); err != nil {
			t.Fatal(err)
		}
	}
	return a, another(t, opts), opts
}

func TestPasskeysInPostgres(t *testing.T) {
	kr, _ := keyring(t, 1)
	a, b, opts := enrolled(t, kr)
	now := time.Now()
	if err := a.AddPasskeyLink("alice", tokenHash("t1"), now.Add(15*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if u, ok, err := b.PasskeyLink(tokenHash("t1"), now); err != nil || !ok || u != "alice" {
		t.Fatalf("link from another store: %q %v %v", u, ok, err)
	}
	if _, ok, _ := b.PasskeyLink(tokenHash("t1"), now.Add(15*time.Minute)); ok {
		t.Fatal("link valid at its expiry")
	}
	if err := a.AddPasskeyLink("carol", tokenHash("t2"), now.Add(time.Minute)); !errors.Is(err, mfa.ErrNotEnrolled) {
		t.Fatalf("link for a user without TOTP: %v", err)
	}

	p := testPasskey(1)
	if u, err := b.EnrollPasskey(tokenHash("t1"), now, p); err != nil || u != "alice" {
		t.Fatalf("enroll: %q %v", u, err)
	}
	got, err := a.UserPasskeys("alice")
	if err != nil || len(got) != 1 || !bytes.Equal(got[0].ID, p.ID) || !bytes.Equal(got[0].Data, p.Data) || got[0].SignCount != 1 || got[0].Created.IsZero() {
		t.Fatalf("alice's passkeys: %+v %v", got, err)
	}
	if u, q, ok, err := a.PasskeyByID(p.ID); err != nil || !ok || u != "alice" || !bytes.Equal(q.Data, p.Data) {
		t.Fatalf("by id: %q %+v %v %v", u, q, ok, err)
	}
	if _, _, ok, err := a.PasskeyByID([]byte("nope")); ok || err != nil {
		t.Fatal("unknown id:", ok, err)
	}
	if _, err := a.EnrollPasskey(tokenHash("t1"), now, testPasskey(2)); !errors.Is(err, mfa.ErrLinkInvalid) {
		t.Fatalf("second use of a link: %v", err)
	}

	// Refusals leave the link usable: a duplicate id, a bad passkey.
	a.AddPasskeyLink("bob", tokenHash("b1"), now.Add(time.Hour))
	if _, err := a.EnrollPasskey(tokenHash("b1"), now, testPasskey(1)); !errors.Is(err, mfa.ErrPasskeyExists) {
		t.Fatalf("duplicate id: %v", err)
	}
	if _, err := a.EnrollPasskey(tokenHash("b1"), now, mfa.Passkey{ID: make([]byte, 1024), Data: []byte("x")}); err == nil {
		t.Fatal("oversize id accepted")
	}
	if u, ok, _ := a.PasskeyLink(tokenHash("b1"), now); !ok || u != "bob" {
		t.Fatal("a refused enrollment used the link")
	}
	a.AddPasskeyLink("alice", tokenHash("expired"), now.Add(-time.Second))
	if _, err := a.EnrollPasskey(tokenHash("expired"), now, testPasskey(3)); !errors.Is(err, mfa.ErrLinkInvalid) {
		t.Fatalf("expired link: %v", err)
	}

	// The data is sealed, bound to alice, and the token is not stored.
	dump, err := startCluster(t).Psql(`SELECT row_to_json(p)::text FROM ` + opts.Schema + `.passkeys p UNION ALL SELECT row_to_json(l)::text FROM ` + opts.Schema + `.passkey_links l`)
	if err != nil {
		t.Fatal(err)
	}
	for _, leak := range []string{"PUBKEY-1", base64.StdEncoding.EncodeToString(p.Data), hex.EncodeToString(p.Data)} {
		if strings.Contains(dump, leak) {
			t.Fatalf("the tables hold %q:\n%s", leak, dump)
		}
	}
	if !strings.Contains(dump, "aes256gcm:"+kr.CurrentID()) {
		t.Fatalf("no sealed passkey in:\n%s", dump)
	}
	if n, err := a.Plaintext(); err != nil || n != 0 {
		t.Fatalf("Plaintext %d %v", n, err)
	}
	a.AddPasskeyLink("bob", tokenHash("b2"), now.Add(time.Hour))
	if _, err := a.EnrollPasskey(tokenHash("b2"), now, testPasskey(20)); err != nil {
		t.Fatal(err)
	}
	if _, err := startCluster(t).Psql(`UPDATE ` + opts.Schema + `.passkeys SET data = (SELECT data FROM ` + opts.Schema + `.passkeys WHERE name = 'alice') WHERE name = 'bob'`); err != nil {
		t.Fatal(err)
	}
	if _, err := a.UserPasskeys("bob"); !errors.Is(err, mfa.ErrTampered) {
		t.Fatalf("alice's passkey moved to bob: %v", err)
	}
	if _, _, _, err := a.PasskeyByID(testPasskey(20).ID); !errors.Is(err, mfa.ErrTampered) {
		t.Fatalf("alice's passkey moved to bob, by id: %v", err)
	}
}

func TestPasskeyLinkOnceAndSignCountAcrossStores(t *testing.T) {
	a, b, _ := enrolled(t, nil)
	now := time.Now()
	if err := a.AddPasskeyLink("alice", tokenHash("once"), now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	var won, lost atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.EnrollPasskey(tokenHash("once"), now, testPasskey(i))
			switch {
			case err == nil:
				won.Add(1)
			case errors.Is(err, mfa.ErrLinkInvalid):
				lost.Add(1)
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	ps, _ := b.UserPasskeys("alice")
	if won.Load() != 1 || lost.Load() != 19 || len(ps) != 1 {
		t.Fatalf("%d won, %d lost, %d passkeys; want 1, 19, 1", won.Load(), lost.Load(), len(ps))
	}
	id, old := ps[0].ID, ps[0].SignCount
	if ok, err := a.SetSignCount(id, old+1, old+2); ok || err != nil {
		t.Fatalf("CAS from a stale count: %v %v", ok, err)
	}
	var moved atomic.Int32
	for i := 0; i < 20; i++ {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if ok, err := s.SetSignCount(id, old, uint32(100+i)); err != nil {
				t.Error(err)
			} else if ok {
				moved.Add(1)
			}
		}()
	}
	wg.Wait()
	_, q, _, _ := a.PasskeyByID(id)
	if moved.Load() != 1 || q.SignCount < 100 {
		t.Fatalf("%d moved the count to %d; want exactly one", moved.Load(), q.SignCount)
	}
	// The full range of the counter.
	if ok, err := a.SetSignCount(id, q.SignCount, 1<<32-1); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if _, q, _, _ := b.PasskeyByID(id); q.SignCount != 1<<32-1 {
		t.Fatal(q.SignCount)
	}

	// The limit per user, with the link left unused by the refusal.
	for i := 1; i < mfa.MaxPasskeysPerUser; i++ {
		tok := fmt.Sprint("many-", i)
		a.AddPasskeyLink("alice", tokenHash(tok), now.Add(time.Hour))
		if _, err := b.EnrollPasskey(tokenHash(tok), now, testPasskey(100+i)); err != nil {
			t.Fatal(i, err)
		}
	}
	a.AddPasskeyLink("alice", tokenHash("one too many"), now.Add(time.Hour))
	if _, err := b.EnrollPasskey(tokenHash("one too many"), now, testPasskey(99)); err == nil || !strings.Contains(err.Error(), "most") {
		t.Fatalf("passkey %d: %v", mfa.MaxPasskeysPerUser+1, err)
	}
	if _, ok, _ := a.PasskeyLink(tokenHash("one too many"), now); !ok {
		t.Fatal("the refusal used the link")
	}
}

func TestPasskeysRemovedResealedPruned(t *testing.T) {
	old, oldText := keyring(t, 1)
	a, _, opts := enrolled(t, old)
	now := time.Now()
	for i, u := range []string{"alice", "alice", "bob"} {
		tok := fmt.Sprint("t", i)
		a.AddPasskeyLink(u, tokenHash(tok), now.Add(time.Minute))
		if _, err := a.EnrollPasskey(tokenHash(tok), now, testPasskey(i)); err != nil {
			t.Fatal(err)
		}
	}
	a.AddPasskeyLink("alice", tokenHash("open"), now.Add(time.Minute))
	a.AddPasskeyLink("bob", tokenHash("bob-open"), now.Add(time.Minute))

	newKey, _ := mfa.NewKeyText()
	both, err := mfa.ParseKeyring(newKey + "\n" + oldText)
	if err != nil {
		t.Fatal(err)
	}
	o := opts
	o.Keys = both
	r := another(t, o)
	if n, err := r.Reseal(); err != nil || n != 2 {
		t.Fatalf("reseal: %d %v", n, err)
	}
	out, _ := startCluster(t).Psql(`SELECT DISTINCT key_id FROM ` + opts.Schema + `.passkeys`)
	if out != both.CurrentID() {
		t.Fatalf("passkey key ids after rotation %q, want %q", out, both.CurrentID())
	}
	onlyNew, _ := mfa.ParseKeyring(newKey)
	o.Keys = onlyNew
	if ps, err := another(t, o).UserPasskeys("alice"); err != nil || len(ps) != 2 {
		t.Fatalf("after reseal, with the new key alone: %d %v", len(ps), err)
	}

	if n, err := r.RemovePasskeys("alice"); err != nil || n != 2 {
		t.Fatalf("remove alice's passkeys: %d %v", n, err)
	}
	if _, ok, _ := r.PasskeyLink(tokenHash("open"), now); ok {
		t.Fatal("alice's open link survived RemovePasskeys")
	}
	if _, ok := r.Secret("alice"); !ok {
		t.Fatal("RemovePasskeys removed the TOTP enrollment")
	}
	if err := r.Remove("bob"); err != nil {
		t.Fatal(err)
	}
	if ps, _ := r.UserPasskeys("bob"); len(ps) != 0 {
		t.Fatal("bob's passkeys survived his removal")
	}
	if _, ok, _ := r.PasskeyLink(tokenHash("bob-open"), now); ok {
		t.Fatal("bob's link survived his removal")
	}

	// Prune deletes used and expired links.
	r.AddPasskeyLink("alice", tokenHash("later"), now.Add(time.Hour))
	r.AddPasskeyLink("alice", tokenHash("soon"), now.Add(time.Minute))
	r.AddPasskeyLink("alice", tokenHash("use"), now.Add(time.Hour))
	r.EnrollPasskey(tokenHash("use"), now, testPasskey(50))
	if err := r.Prune(now.Add(2 * time.Minute)); err != nil {
		t.Fatal(err)
	}
	if out, _ := startCluster(t).Psql(`SELECT count(*) FROM ` + opts.Schema + `.passkey_links`); out != "1" {
		t.Fatalf("%s links after Prune, want 1", out)
	}
}

// The proxy's role (the approval page runs in pgmfa serve) reads and
// registers passkeys, uses links and moves sign counts, and cannot make
// links or remove passkeys.
func TestPasskeysLeastPrivilege(t *testing.T) {
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
	now := time.Now()
	if err := s.AddPasskeyLink("alice", tokenHash("t"), now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if u, ok, err := p.PasskeyLink(tokenHash("t"), now); err != nil || !ok || u != "alice" {
		t.Fatal(u, ok, err)
	}
	pk := testPasskey(1)
	if _, err := p.EnrollPasskey(tokenHash("t"), now, pk); err != nil {
		t.Fatal("enroll as the proxy's role:", err)
	}
	if ok, err := p.SetSignCount(pk.ID, 1, 2); !ok || err != nil {
		t.Fatal("sign count as the proxy's role:", ok, err)
	}
	if ps, err := p.UserPasskeys("alice"); err != nil || len(ps) != 1 {
		t.Fatal(ps, err)
	}
	if err := p.Prune(now); err != nil {
		t.Fatal("prune as the proxy's role:", err)
	}
	if err := p.AddPasskeyLink("alice", tokenHash("x"), now.Add(time.Minute)); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("link as the proxy's role: %v", err)
	}
	if _, err := p.RemovePasskeys("alice"); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("remove as the proxy's role: %v", err)
	}
	// The owner's removal of the user cascades past the proxy's rows.
	if err := s.Remove("alice"); err != nil {
		t.Fatal(err)
	}
	if _, _, ok, _ := p.PasskeyByID(pk.ID); ok {
		t.Fatal("passkey survived its user")
	}
}

// ImportPasskeys (store migrate) writes all or nothing.
func TestImportPasskeys(t *testing.T) {
	a, _, opts := enrolled(t, nil)
	n, err := a.ImportPasskeys(map[string][]mfa.Passkey{"alice": {testPasskey(1), testPasskey(2)}, "bob": {testPasskey(3)}})
	if err != nil || n != 3 {
		t.Fatal(n, err)
	}
	if ps, _ := a.UserPasskeys("alice"); len(ps) != 2 || ps[1].SignCount != 2 {
		t.Fatalf("imported: %+v", ps)
	}
	for _, bad := range []map[string][]mfa.Passkey{
		{"alice": {testPasskey(4), testPasskey(1)}}, // 1 is there already
		{"alice": {testPasskey(5)}, "carol": {testPasskey(6)}},
	} {
		if _, err := a.ImportPasskeys(bad); err == nil || !strings.Contains(err.Error(), "no passkey was copied") {
			t.Fatalf("import %v: %v", bad, err)
		}
	}
	if out, _ := startCluster(t).Psql(`SELECT count(*) FROM ` + opts.Schema + `.passkeys`); out != "3" {
		t.Fatalf("%s passkeys after refused imports, want 3", out)
	}
}
