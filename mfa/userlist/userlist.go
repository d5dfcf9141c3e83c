// Package userlist reads pgbouncer's auth_file (userlist.txt), so that
// `pgmfa account import` can take over pgbouncer's users with the
// verifiers they already have.
//
// The format, as pgbouncer reads it: one user per line, two double-quoted
// fields, the name and the password, a double quote inside a field written
// twice (""). The password is a SCRAM-SHA-256 verifier, an MD5 hash
// ("md5" + md5hex(password + user)) or a plaintext password. Blank lines
// and lines starting with ';' or '#' are skipped; pgbouncer ignores what
// follows the second field, and so does this parser. Unlike pgbouncer,
// which skips lines it cannot read, a malformed line is an error with its
// number: an import that silently leaves a user out would lock that user
// out without a word.
package userlist

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Entry is one user of the file.
type Entry struct {
	User, Password string
}

// Kind says what the password field holds.
func (e Entry) Kind() string {
	switch {
	case strings.HasPrefix(e.Password, "SCRAM-SHA-256$"):
		return "scram-sha-256"
	case len(e.Password) == 35 && strings.HasPrefix(e.Password, "md5") && isHex(e.Password[3:]):
		return "md5"
	}
	return "plaintext"
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

// maxLine bounds a line (pgbouncer's own limit on a field is far lower).
const maxLine = 64 << 10

// Parse reads a userlist. A user that appears twice is an error (pgbouncer
// takes the last; an import should not guess).
func Parse(r io.Reader) ([]Entry, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), maxLine)
	var out []Entry
	seen := map[string]int{}
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == ';' || line[0] == '#' {
			continue
		}
		user, rest, err := field(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: user name: %w", n, err)
		}
		rest = strings.TrimLeft(rest, " \t")
		password, _, err := field(rest)
		if err != nil {
			return nil, fmt.Errorf("line %d: password: %w", n, err)
		}
		if user == "" {
			return nil, fmt.Errorf("line %d: empty user name", n)
		}
		if password == "" {
			return nil, fmt.Errorf("line %d: user %q has an empty password", n, user)
		}
		if strings.ContainsRune(user+password, 0) {
			return nil, fmt.Errorf("line %d: NUL byte", n)
		}
		if prev, dup := seen[user]; dup {
			return nil, fmt.Errorf("line %d: user %q already on line %d", n, user, prev)
		}
		seen[user] = n
		out = append(out, Entry{User: user, Password: password})
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, fmt.Errorf("a line is longer than %d bytes", maxLine)
		}
		return nil, err
	}
	return out, nil
}

// field reads one double-quoted field at the start of s and returns it
// unescaped, and the rest of s.
func field(s string) (value, rest string, err error) {
	if s == "" || s[0] != '"' {
		return "", "", errors.New(`expected a double-quoted field ("...")`)
	}
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		if s[i] != '"' {
			b.WriteByte(s[i])
			continue
		}
		if i+1 < len(s) && s[i+1] == '"' {
			b.WriteByte('"')
			i++
			continue
		}
		return b.String(), s[i+1:], nil
	}
	return "", "", errors.New("unterminated double-quoted field")
}
