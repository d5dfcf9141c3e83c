package proto

import (
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"hash"
	"io"
	"strconv"
	"strings"
)

// SCRAM (RFC 5802) written once, parameterised by the hash, so that the
// RFC 5802 SHA-1 and RFC 7677 SHA-256 examples both exercise the very code
// that talks to PostgreSQL. The exported API only ever uses SHA-256.

// scramHash is one SCRAM-H instantiation.
type scramHash struct {
	new  func() hash.Hash
	size int
}

var (
	scramSHA256 = &scramHash{new: sha256.New, size: sha256.Size}
	scramSHA1   = &scramHash{new: sha1.New, size: sha1.Size}
)

const (
	mechSCRAM     = "SCRAM-SHA-256"
	mechSCRAMPlus = "SCRAM-SHA-256-PLUS"
	// scramNonceLen is the raw length of our nonces; libpq and PostgreSQL
	// both use 18 bytes (24 base64 characters).
	scramNonceLen = 18
	// DefaultMaxSCRAMIterations bounds the iteration count a server may ask
	// of UpstreamLogin: PBKDF2 cost is the server's to choose, and a hostile
	// or misconfigured one could otherwise pin a CPU per login.
	DefaultMaxSCRAMIterations = 1 << 20
	// gs2 header of a client that does not use channel binding ("n,,"), and
	// its base64 form as sent in the client-final "c=" attribute.
	gs2NoCB    = "n,,"
	gs2NoCBB64 = "biws"
)

func (h *scramHash) hmac(key []byte, msg ...string) []byte {
	m := hmac.New(h.new, key)
	for _, s := range msg {
		io.WriteString(m, s)
	}
	return m.Sum(nil)
}

func (h *scramHash) sum(b []byte) []byte {
	d := h.new()
	d.Write(b)
	return d.Sum(nil)
}

// saltedPassword is Hi(password, salt, i) = PBKDF2-HMAC-H.
//
// The password goes through SASLprep first, as PostgreSQL and libpq do.
func (h *scramHash) saltedPassword(password string, salt []byte, iter int) []byte {
	k, err := pbkdf2.Key(h.new, saslPrep(password), salt, iter, h.size)
	if err != nil {
		// Only FIPS-140 mode rejects parameters (short salts/keys); the
		// verifier/exchange was validated before.
		panic("proto: pbkdf2: " + err.Error())
	}
	return k
}

// scramKeys are the keys PostgreSQL stores: StoredKey = H(ClientKey) and
// ServerKey.
type scramKeys struct {
	stored, server []byte
}

func (h *scramHash) keys(salted []byte) (clientKey []byte, k scramKeys) {
	clientKey = h.hmac(salted, "Client Key")
	return clientKey, scramKeys{stored: h.sum(clientKey), server: h.hmac(salted, "Server Key")}
}

// scramAttrs parses "a=1,b=2" SCRAM attribute lists in order. Each attribute
// name is one letter, as RFC 5802 §5.1 requires.
func scramAttrs(msg string) ([][2]string, error) {
	var out [][2]string
	for _, part := range strings.Split(msg, ",") {
		if len(part) < 2 || part[1] != '=' || !(part[0] >= 'a' && part[0] <= 'z' || part[0] >= 'A' && part[0] <= 'Z') {
			return nil, fmt.Errorf("malformed SCRAM attribute %q", clip(part))
		}
		out = append(out, [2]string{part[:1], part[2:]})
	}
	return out, nil
}

func clip(s string) string {
	if len(s) > 32 {
		return s[:32] + "..."
	}
	return s
}

// validNonce reports whether s is a SCRAM nonce: printable ASCII except ','.
func validNonce(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e || s[i] == ',' {
			return false
		}
	}
	return true
}

func newNonce(rand io.Reader) (string, error) {
	if rand == nil {
		return "", fmt.Errorf("no randomness source configured for SCRAM")
	}
	b := make([]byte, scramNonceLen)
	if _, err := io.ReadFull(rand, b); err != nil {
		return "", fmt.Errorf("reading SCRAM nonce: %w", err)
	}
	return base64.StdEncoding.EncodeToString(b), nil
}

// scramClient is the client side of one SCRAM exchange.
type scramClient struct {
	h             *scramHash
	password      string
	clientNonce   string
	maxIterations int

	clientFirstBare string
	authMessage     string
	serverKey       []byte
}

// clientFirst returns the client-first-message. Its user name is empty, as
// libpq sends it: PostgreSQL ignores the SCRAM user and authenticates the
// startup packet's user (auth-scram.c, read_client_first_message).
func (c *scramClient) clientFirst() string {
	c.clientFirstBare = "n=,r=" + c.clientNonce
	return gs2NoCB + c.clientFirstBare
}

// clientFinal consumes the server-first-message and returns the
// client-final-message.
func (c *scramClient) clientFinal(serverFirst string) (string, error) {
	attrs, err := scramAttrs(serverFirst)
	if err != nil {
		return "", err
	}
	if len(attrs) > 0 && attrs[0][0] == "m" {
		return "", fmt.Errorf("server requires an unsupported SCRAM extension")
	}
	if len(attrs) < 3 || attrs[0][0] != "r" || attrs[1][0] != "s" || attrs[2][0] != "i" {
		return "", fmt.Errorf("malformed SCRAM server-first-message")
	}
	nonce := attrs[0][1]
	if !strings.HasPrefix(nonce, c.clientNonce) || len(nonce) == len(c.clientNonce) || !validNonce(nonce) {
		return "", fmt.Errorf("SCRAM server nonce does not extend the client nonce")
	}
	salt, err := base64.StdEncoding.Strict().DecodeString(attrs[1][1])
	if err != nil || len(salt) == 0 {
		return "", fmt.Errorf("malformed SCRAM salt")
	}
	iter, err := strconv.Atoi(attrs[2][1])
	if err != nil || iter < 1 {
		return "", fmt.Errorf("malformed SCRAM iteration count")
	}
	if iter > c.maxIterations {
		return "", fmt.Errorf("SCRAM iteration count %d exceeds the limit of %d", iter, c.maxIterations)
	}
	salted := c.h.saltedPassword(c.password, salt, iter)
	clientKey, keys := c.h.keys(salted)
	withoutProof := "c=" + gs2NoCBB64 + ",r=" + nonce
	c.authMessage = c.clientFirstBare + "," + serverFirst + "," + withoutProof
	sig := c.h.hmac(keys.stored, c.authMessage)
	proof := make([]byte, len(clientKey))
	subtle.XORBytes(proof, clientKey, sig)
	c.serverKey = keys.server
	return withoutProof + ",p=" + base64.StdEncoding.EncodeToString(proof), nil
}

// verifyServerFinal checks the server-final-message's signature, in
// constant time. This is what proves the server knew the password.
func (c *scramClient) verifyServerFinal(serverFinal string) error {
	if c.serverKey == nil {
		return fmt.Errorf("SCRAM server-final-message before server-first-message")
	}
	attrs, err := scramAttrs(serverFinal)
	if err != nil {
		return err
	}
	if len(attrs) == 0 {
		return fmt.Errorf("empty SCRAM server-final-message")
	}
	switch attrs[0][0] {
	case "e":
		return fmt.Errorf("server reported SCRAM error %q", clip(attrs[0][1]))
	case "v":
	default:
		return fmt.Errorf("malformed SCRAM server-final-message")
	}
	got, err := base64.StdEncoding.Strict().DecodeString(attrs[0][1])
	if err != nil {
		return fmt.Errorf("malformed SCRAM server signature")
	}
	want := c.h.hmac(c.serverKey, c.authMessage)
	if !hmac.Equal(got, want) {
		return fmt.Errorf("SCRAM server signature does not match: the server does not know the password")
	}
	return nil
}

// scramServer is the server side of one SCRAM exchange against a stored
// verifier.
type scramServer struct {
	h     *scramHash
	salt  []byte
	iter  int
	keys  scramKeys
	nonce string // server part, appended to the client's

	gs2             string
	clientFirstBare string
	serverFirst     string
	combinedNonce   string
}

// scramFailure is a refusal the server side reports; code selects the
// SQLSTATE, PostgreSQL's for the same message (a malformed exchange is
// 08P01, an unsupported feature 0A000).
type scramFailure struct {
	code, msg string
}

func (e *scramFailure) Error() string { return e.msg }

func badSCRAM(format string, args ...any) error {
	return &scramFailure{code: CodeProtocolViolation, msg: fmt.Sprintf(format, args...)}
}

// serverFirst consumes the client-first-message.
func (s *scramServer) serverFirstMsg(clientFirst string) (string, error) {
	// gs2-header: cbind-flag "," [authzid] ","
	flag, rest, ok := strings.Cut(clientFirst, ",")
	if !ok {
		return "", badSCRAM("malformed SCRAM client-first-message")
	}
	switch {
	case flag == "n", flag == "y":
		// "y": the client could bind but believes we cannot; we do not
		// advertise -PLUS, so that belief is right.
	case strings.HasPrefix(flag, "p="):
		// Binding data under plain SCRAM-SHA-256 (we never offer -PLUS,
		// which pgmfa, terminating the connection, could not honour):
		// PostgreSQL calls that a malformed message, 08P01.
		return "", badSCRAM("malformed SCRAM message: the client selected SCRAM-SHA-256 without channel binding, but the message includes channel binding data")
	default:
		return "", badSCRAM("malformed SCRAM client-first-message: unexpected channel-binding flag")
	}
	authzid, bare, ok := strings.Cut(rest, ",")
	if !ok {
		return "", badSCRAM("malformed SCRAM client-first-message")
	}
	if authzid != "" {
		// feature_not_supported, as PostgreSQL answers.
		return "", &scramFailure{code: CodeFeatureNotSupported, msg: "client uses authorization identity, but it is not supported"}
	}
	s.gs2 = flag + ",,"
	attrs, err := scramAttrs(bare)
	if err != nil {
		return "", badSCRAM("%v", err)
	}
	if len(attrs) > 0 && attrs[0][0] == "m" {
		return "", &scramFailure{code: CodeFeatureNotSupported, msg: "client requires an unsupported SCRAM extension"}
	}
	if len(attrs) < 2 || attrs[0][0] != "n" || attrs[1][0] != "r" {
		return "", badSCRAM("malformed SCRAM client-first-message")
	}
	// The user name is ignored, as PostgreSQL does: the startup packet's
	// user is the one being authenticated.
	if !validNonce(attrs[1][1]) {
		return "", badSCRAM("malformed SCRAM client nonce")
	}
	s.clientFirstBare = bare
	s.combinedNonce = attrs[1][1] + s.nonce
	s.serverFirst = "r=" + s.combinedNonce + ",s=" + base64.StdEncoding.EncodeToString(s.salt) + ",i=" + strconv.Itoa(s.iter)
	return s.serverFirst, nil
}

// serverFinalMsg consumes the client-final-message. ok is false when the
// proof is wrong (the password is wrong); err is set when the message is
// malformed or inconsistent.
func (s *scramServer) serverFinalMsg(clientFinal string) (final string, ok bool, err error) {
	attrs, err := scramAttrs(clientFinal)
	if err != nil {
		return "", false, badSCRAM("%v", err)
	}
	if len(attrs) < 3 || attrs[0][0] != "c" || attrs[1][0] != "r" || attrs[len(attrs)-1][0] != "p" {
		return "", false, badSCRAM("malformed SCRAM client-final-message")
	}
	cb, err := base64.StdEncoding.Strict().DecodeString(attrs[0][1])
	if err != nil || string(cb) != s.gs2 {
		return "", false, badSCRAM("SCRAM channel binding data does not match the client-first-message")
	}
	if subtle.ConstantTimeCompare([]byte(attrs[1][1]), []byte(s.combinedNonce)) != 1 {
		return "", false, badSCRAM("SCRAM nonce does not match")
	}
	proof, err := base64.StdEncoding.Strict().DecodeString(attrs[len(attrs)-1][1])
	if err != nil || len(proof) != s.h.size {
		return "", false, badSCRAM("malformed SCRAM client proof")
	}
	withoutProof := clientFinal[:strings.LastIndex(clientFinal, ",p=")]
	authMessage := s.clientFirstBare + "," + s.serverFirst + "," + withoutProof
	sig := s.h.hmac(s.keys.stored, authMessage)
	clientKey := make([]byte, len(proof))
	subtle.XORBytes(clientKey, proof, sig)
	if !hmac.Equal(s.h.sum(clientKey), s.keys.stored) {
		return "", false, nil
	}
	return "v=" + base64.StdEncoding.EncodeToString(s.h.hmac(s.keys.server, authMessage)), true, nil
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
