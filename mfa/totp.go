package mfa

import (
	"crypto/subtle"
	"time"

	"github.com/pquerna/otp"
	"github.com/pquerna/otp/hotp"
)

// params are the resolved TOTP parameters of one account.
type params struct {
	digits  int
	period  int64 // seconds
	alg     otp.Algorithm
	algName string
}

// resolve fills an account's zero parameters from the defaults. A malformed
// algorithm in the account (a store edited by hand) is an error, not SHA1.
func resolve(a Account, defaults Options) (params, error) {
	p := params{digits: a.Digits, period: int64(a.Period / time.Second), algName: a.Algorithm}
	if p.digits == 0 {
		p.digits = defaults.Digits
	}
	if p.period <= 0 {
		p.period = int64(defaults.Period / time.Second)
	}
	if p.algName == "" {
		p.algName = defaults.Algorithm
	}
	if err := validateTOTP(p.digits, time.Duration(p.period)*time.Second, p.algName); err != nil {
		return params{}, err
	}
	p.alg, _ = parseAlgorithm(p.algName)
	return p, nil
}

func (p params) digitsOpt() otp.Digits {
	if p.digits == 8 {
		return otp.DigitsEight
	}
	return otp.DigitsSix
}

// stepAt is RFC 6238's T = floor((unix time - T0) / X) with T0 = 0.
func (p params) stepAt(t time.Time) int64 {
	u := t.Unix()
	s := u / p.period
	if u < 0 && u%p.period != 0 {
		s--
	}
	return s
}

// codeAt is the code of one time step.
func codeAt(secret string, step int64, p params) (string, error) {
	return hotp.GenerateCodeCustom(secret, uint64(step), hotp.ValidateOpts{Digits: p.digitsOpt(), Algorithm: p.alg})
}

// matchingSteps returns, oldest first, the steps within skew of now whose
// code equals code. Every step in the window is computed and compared in
// constant time, so the answer's timing does not say which step matched.
func matchingSteps(secret, code string, now time.Time, skew uint, p params) ([]int64, error) {
	center := p.stepAt(now)
	var out []int64
	for s := center - int64(skew); s <= center+int64(skew); s++ {
		if s < 0 {
			continue
		}
		want, err := codeAt(secret, s, p)
		if err != nil {
			return nil, err
		}
		if subtle.ConstantTimeCompare([]byte(want), []byte(code)) == 1 {
			out = append(out, s)
		}
	}
	return out, nil
}

// wellFormed reports whether code has the account's number of ASCII digits.
func wellFormed(code string, p params) bool {
	if len(code) != p.digits {
		return false
	}
	for i := 0; i < len(code); i++ {
		if code[i] < '0' || code[i] > '9' {
			return false
		}
	}
	return true
}
