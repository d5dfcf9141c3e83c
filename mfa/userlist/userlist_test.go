package userlist

import (
	"bytes"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
)

const sample = `; pgbouncer userlist
"alice" "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"
"bob"   "md5d0b7b8a4b5fb6e7a6f33e2d4d4f1a2b3"   trailing words pgbouncer ignores

# a comment
"o""brien" "pa""ss word"
`

func TestParse(t *testing.T) {
	got, err := Parse(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	want := []Entry{
		{"alice", "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"},
		{"bob", "md5d0b7b8a4b5fb6e7a6f33e2d4d4f1a2b3"},
		{`o"brien`, `pa"ss word`},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q", got)
	}
	if got[0].Kind() != "scram-sha-256" || got[1].Kind() != "md5" || got[2].Kind() != "plaintext" {
		t.Fatal(got[0].Kind(), got[1].Kind(), got[2].Kind())
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`alice "pw"`, "line 1: user name"},
		{`"alice" pw`, "line 1: password"},
		{`"alice" "pw`, "unterminated"},
		{"\n\"\" \"pw\"", "line 2: empty user name"},
		{`"alice" ""`, "empty password"},
		{"\"a\" \"x\"\n\"a\" \"y\"", `line 2: user "a" already on line 1`},
		{`"a` + strings.Repeat("x", maxLine) + `" "x"`, "longer than"},
	} {
		if _, err := Parse(strings.NewReader(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%.40q: %v, want %q", tc.in, err, tc.want)
		}
	}
}

// FuzzParse: Parse never panics; what it accepts has named users with
// passwords, and Format writes it back to a file that parses the same.
func FuzzParse(f *testing.F) {
	f.Add([]byte(sample))
	f.Add([]byte(`"a" "b"`))
	f.Add([]byte(`"a""" """b"`))
	f.Fuzz(func(t *testing.T, in []byte) {
		entries, err := Parse(bytes.NewReader(in))
		if err != nil {
			return
		}
		for _, e := range entries {
			if e.User == "" || e.Password == "" {
				t.Fatalf("accepted an empty field: %q", e)
			}
		}
		var buf bytes.Buffer
		if err := Format(&buf, entries); err != nil {
			t.Fatal(err)
		}
		again, err := Parse(&buf)
		if err != nil {
			t.Fatalf("formatted entries do not parse: %v\n%q", err, buf.String())
		}
		if len(entries) > 0 && !reflect.DeepEqual(again, entries) {
			t.Fatalf("round trip:\n%q\n%q", entries, again)
		}
	})
}

// Format writes entries in the file's format (the inverse of Parse), for
// the fuzzer's round trip.
func Format(w io.Writer, entries []Entry) error {
	q := func(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }
	for _, e := range entries {
		if _, err := fmt.Fprintf(w, "%s %s\n", q(e.User), q(e.Password)); err != nil {
			return err
		}
	}
	return nil
}
