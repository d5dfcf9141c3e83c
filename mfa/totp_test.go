package mfa

import (
	"testing"
	"time"
)

// RFC 6238 Appendix B: 8 digits, 30 s, T0 = 0, with the key lengths the
// reference implementation uses for each hash.
var rfc6238 = []struct {
	unix   int64
	sha1   string
	sha256 string
	sha512 string
}{
	{59, "94287082", "46119246", "90693936"},
	{1111111109, "07081804", "68084774", "25091201"},
	{1111111111, "14050471", "67062674", "99943326"},
	{1234567890, "89005924", "91819424", "93441116"},
	{2000000000, "69279037", "90698825", "38618901"},
	{20000000000, "65353130", "77737706", "47863826"},
}

var rfcKeys = map[string]string{
	"SHA1":   "12345678901234567890",
	"SHA256": "12345678901234567890123456789012",
	"SHA512": "1234567890123456789012345678901234567890123456789012345678901234",
}

func TestRFC6238Vectors(t *testing.T) {
	for _, v := range rfc6238 {
		for alg, want := range map[string]string{"SHA1": v.sha1, "SHA256": v.sha256, "SHA512": v.sha512} {
			at := time.Unix(v.unix, 0)
			acct := Account{Secret: b32(rfcKeys[alg]), Digits: 8, Period: 30 * time.Second, Algorithm: alg}

			// The generator.
			p, err := resolve(acct, Options{}.withDefaults())
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := codeAt(acct.Secret, p.stepAt(at), p); got != want {
				t.Errorf("%s at %d: code %s, want %s", alg, v.unix, got, want)
			}

			// The Guard, with the parameters from the account ...
			clk := newClock(at)
			g := NewGuard(Options{Now: clk.Now}, accounts{"u": acct})
			if o := g.Verify("u", "192.0.2.1:5000", want); !o.OK {
				t.Errorf("%s at %d: Guard refused the RFC code: %+v", alg, v.unix, o)
			}
			// ... and from the options, through a plain Secrets.
			g = NewGuard(Options{Digits: 8, Algorithm: alg, Now: clk.Now}, onlySecrets{accounts{"u": {Secret: acct.Secret}}})
			if o := g.Verify("u", "192.0.2.1:5000", want); !o.OK {
				t.Errorf("%s at %d: Guard (defaults) refused the RFC code: %+v", alg, v.unix, o)
			}
		}
	}
}

func TestStepBoundaries(t *testing.T) {
	p := params{period: 30}
	for _, c := range []struct {
		unix int64
		step int64
	}{{0, 0}, {29, 0}, {30, 1}, {59, 1}, {60, 2}, {-1, -1}, {-30, -1}, {-31, -2}} {
		if got := p.stepAt(time.Unix(c.unix, 0)); got != c.step {
			t.Errorf("stepAt(%d) = %d, want %d", c.unix, got, c.step)
		}
	}
}

func TestOptionsValidate(t *testing.T) {
	bad := []Options{
		{Digits: 7},
		{Period: 1500 * time.Millisecond},
		{Period: -time.Second},
		{Algorithm: "MD5"},
		{Remember: -time.Second},
		{FailureWindow: -time.Second},
	}
	for _, o := range bad {
		if o.Validate() == nil {
			t.Errorf("%+v validated", o)
		}
	}
	good := []Options{{}, {Digits: 8, Period: time.Minute, Algorithm: "sha-256"}, {Algorithm: "sha512"}}
	for _, o := range good {
		if err := o.Validate(); err != nil {
			t.Errorf("%+v: %v", o, err)
		}
	}
	defer func() {
		if recover() == nil {
			t.Error("NewGuard accepted invalid options")
		}
	}()
	NewGuard(Options{Digits: 7}, accounts{})
}
