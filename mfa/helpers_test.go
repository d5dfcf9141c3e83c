package mfa

import (
	"encoding/base32"
	"sync"
	"testing"
	"time"
)

// clock is an injected clock tests move by hand.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock(t time.Time) *clock { return &clock{t: t} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// accounts is an in-memory Accounts.
type accounts map[string]Account

func (a accounts) Secret(user string) (string, bool) {
	acct, ok := a[user]
	return acct.Secret, ok
}

func (a accounts) Account(user string) (Account, bool) {
	acct, ok := a[user]
	return acct, ok
}

// onlySecrets hides Account, to test the plain Secrets path.
type onlySecrets struct{ a accounts }

func (s onlySecrets) Secret(user string) (string, bool) { return s.a.Secret(user) }

func b32(s string) string {
	return base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString([]byte(s))
}

// t0 is an arbitrary instant at the start of a 30 s step.
var t0 = time.Unix(1_800_000_000, 0).UTC()

const secretA = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"

// code computes user's code at t with the guard's view of the account.
func code(t *testing.T, g *Guard, user string, at time.Time) string {
	t.Helper()
	c, err := g.Code(user, at)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// otherCode returns a well-formed code that is not valid within skew of at.
func otherCode(t *testing.T, g *Guard, user string, at time.Time) string {
	t.Helper()
	valid := map[string]bool{}
	for d := -3; d <= 3; d++ {
		valid[code(t, g, user, at.Add(time.Duration(d)*30*time.Second))] = true
	}
	for _, c := range []string{"000000", "111111", "222222", "333333", "444444", "555555", "666666", "777777"} {
		if !valid[c] {
			return c
		}
	}
	t.Fatal("no invalid code found")
	return ""
}
