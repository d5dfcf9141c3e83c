package proto

import (
	"crypto/hmac"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
)

// Verifier is a stored password verifier in one of the formats PostgreSQL
// keeps in pg_authid.rolpassword:
//
//	SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>
//	md5<32 lower-case hex digits>
//
// so verifiers can be copied from a database as they are. Plaintext
// passwords are not accepted.
type Verifier struct {
	scram bool
	// SCRAM
	iter int
	salt []byte
	keys scramKeys
	// MD5: the 32 hex digits, md5hex(password + user)
	md5 string
}

// ParseVerifier parses a verifier as PostgreSQL stores it.
func ParseVerifier(s string) (*Verifier, error) {
	if strings.HasPrefix(s, "md5") {
		h := s[3:]
		if len(h) != 32 {
			return nil, fmt.Errorf("md5 verifier must be \"md5\" followed by 32 hex digits")
		}
		if _, err := hex.DecodeString(h); err != nil {
			return nil, fmt.Errorf("md5 verifier must be \"md5\" followed by 32 hex digits")
		}
		return &Verifier{md5: strings.ToLower(h)}, nil
	}
	rest, ok := strings.CutPrefix(s, "SCRAM-SHA-256$")
	if !ok {
		return nil, fmt.Errorf("unsupported verifier: expected \"SCRAM-SHA-256$...\" or \"md5...\" as stored in pg_authid")
	}
	params, keys, ok := strings.Cut(rest, "$")
	iterS, saltS, ok1 := strings.Cut(params, ":")
	storedS, serverS, ok2 := strings.Cut(keys, ":")
	if !ok || !ok1 || !ok2 {
		return nil, fmt.Errorf("malformed SCRAM-SHA-256 verifier")
	}
	iter, err := strconv.Atoi(iterS)
	if err != nil || iter < 1 || iter > 1<<24 {
		return nil, fmt.Errorf("malformed SCRAM-SHA-256 verifier: bad iteration count")
	}
	b64 := base64.StdEncoding.Strict()
	salt, err := b64.DecodeString(saltS)
	if err != nil || len(salt) == 0 {
		return nil, fmt.Errorf("malformed SCRAM-SHA-256 verifier: bad salt")
	}
	stored, err1 := b64.DecodeString(storedS)
	server, err2 := b64.DecodeString(serverS)
	if err1 != nil || err2 != nil || len(stored) != scramSHA256.size || len(server) != scramSHA256.size {
		return nil, fmt.Errorf("malformed SCRAM-SHA-256 verifier: bad keys")
	}
	return &Verifier{scram: true, iter: iter, salt: salt, keys: scramKeys{stored: stored, server: server}}, nil
}

// NewSCRAMVerifier computes a SCRAM-SHA-256 verifier the way PostgreSQL
// does (for tests and tooling; PostgreSQL uses a 16-byte random salt and
// 4096 iterations by default).
func NewSCRAMVerifier(password string, salt []byte, iterations int) string {
	_, k := scramSHA256.keys(scramSHA256.saltedPassword(password, salt, iterations))
	b64 := base64.StdEncoding
	return fmt.Sprintf("SCRAM-SHA-256$%d:%s$%s:%s", iterations, b64.EncodeToString(salt),
		b64.EncodeToString(k.stored), b64.EncodeToString(k.server))
}

// NewMD5Verifier computes an MD5 verifier ("md5" + md5hex(password+user)).
func NewMD5Verifier(user, password string) string { return md5Verifier(user, password) }

// IsSCRAM reports whether v is a SCRAM-SHA-256 verifier (else MD5).
func (v *Verifier) IsSCRAM() bool { return v.scram }

// String returns the verifier in its stored form.
func (v *Verifier) String() string {
	if !v.scram {
		return "md5" + v.md5
	}
	b64 := base64.StdEncoding
	return fmt.Sprintf("SCRAM-SHA-256$%d:%s$%s:%s", v.iter, b64.EncodeToString(v.salt),
		b64.EncodeToString(v.keys.stored), b64.EncodeToString(v.keys.server))
}

// checkCleartext verifies a cleartext password against v (for the
// "password" method), in constant time in the comparison.
func (v *Verifier) checkCleartext(user, password string) bool {
	if v.scram {
		_, k := scramSHA256.keys(scramSHA256.saltedPassword(password, v.salt, v.iter))
		return hmac.Equal(k.stored, v.keys.stored) && hmac.Equal(k.server, v.keys.server)
	}
	got := md5Verifier(user, password)
	return subtle.ConstantTimeCompare([]byte(got), []byte("md5"+v.md5)) == 1
}

// checkMD5 verifies a response to AuthenticationMD5Password.
func (v *Verifier) checkMD5(response string, salt [4]byte) bool {
	if v.scram {
		return false
	}
	want := md5Response(v.md5, salt)
	return subtle.ConstantTimeCompare([]byte(response), []byte(want)) == 1
}

// Iterations is a SCRAM verifier's iteration count (0 for MD5).
func (v *Verifier) Iterations() int { return v.iter }
