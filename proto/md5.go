package proto

import (
	"crypto/md5"
	"encoding/hex"
)

// md5Hex is the lower-case hex MD5 of the concatenation of parts.
func md5Hex(parts ...[]byte) string {
	h := md5.New()
	for _, p := range parts {
		h.Write(p)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// md5Verifier is what PostgreSQL stores for an MD5 password:
// "md5" + md5hex(password + user).
func md5Verifier(user, password string) string {
	return "md5" + md5Hex([]byte(password), []byte(user))
}

// md5Response is the client's answer to AuthenticationMD5Password:
// "md5" + md5hex(md5hex(password + user) + salt). Only the inner hash is
// needed, which is why an MD5 verifier is password-equivalent.
func md5Response(innerHex string, salt [4]byte) string {
	return "md5" + md5Hex([]byte(innerHex), salt[:])
}
