package proto

import (
	"errors"
	"maps"
	"testing"
)

func TestStripMFACode(t *testing.T) {
	const del = "\x00deleted"
	cases := []struct {
		name    string
		params  map[string]string
		code    string
		options string // want; del means deleted
		extra   map[string]string
	}{
		{name: "none", params: map[string]string{"user": "u", "options": "-c search_path=x"}, options: "-c search_path=x"},
		{name: "bare param", params: map[string]string{"user": "u", "pgmfa.code": "123456"}, code: "123456", options: del},
		{name: "bare param case", params: map[string]string{"PGMFA.Code": "123456"}, code: "123456", options: del},
		{name: "only -c", params: map[string]string{"options": "-c pgmfa.code=111111"}, code: "111111", options: del},
		{name: "only -c padded", params: map[string]string{"options": "  -c  pgmfa.code=111111 \t"}, code: "111111", options: del},
		{name: "-cNAME", params: map[string]string{"options": "-cpgmfa.code=222222"}, code: "222222", options: del},
		{name: "--NAME", params: map[string]string{"options": "--pgmfa.code=333333"}, code: "333333", options: del},
		{name: "start", params: map[string]string{"options": "-c pgmfa.code=1 -c work_mem=64MB"}, code: "1", options: " -c work_mem=64MB"},
		{name: "middle", params: map[string]string{"options": "-c a.b=1 -c pgmfa.code=2 -c c.d=3"}, code: "2", options: "-c a.b=1  -c c.d=3"},
		{name: "end", params: map[string]string{"options": "-c a.b=1 --pgmfa.code=3"}, code: "3", options: "-c a.b=1 "},
		{name: "escaped spaces kept", params: map[string]string{"options": `-c application_name=my\ app -c pgmfa.code=4 -c search_path=a\ b`},
			code: "4", options: `-c application_name=my\ app  -c search_path=a\ b`},
		{name: "escaped space in code", params: map[string]string{"options": `-c pgmfa.code=12\ 34`}, code: "12 34", options: del},
		{name: "escaped backslash", params: map[string]string{"options": `-c x.y=a\\ -c pgmfa.code=5`}, code: "5", options: `-c x.y=a\\ `},
		{name: "escaped name not split", params: map[string]string{"options": `-c x.y=a\ -c\ pgmfa.code=6`}, options: `-c x.y=a\ -c\ pgmfa.code=6`},
		{name: "multiple same", params: map[string]string{"pgmfa.code": "7", "options": "-c pgmfa.code=7 --pgmfa.code=7"}, code: "7", options: del},
		{name: "other pgmfa param", params: map[string]string{"pgmfa.user": "x", "options": "-c pgmfa.other=1 -c x.y=1"}, options: " -c x.y=1"},
		{name: "dash to underscore", params: map[string]string{"options": "--pgmfa.foo-bar=1"}, options: del},
		{name: "tabs newlines", params: map[string]string{"options": "-c\tpgmfa.code=8\n-c x.y=z"}, code: "8", options: "\n-c x.y=z"},
		{name: "-c at end", params: map[string]string{"options": "-c"}, options: "-c"},
		// A bare word: PostgreSQL would refuse it and echo it; take it.
		{name: "bare word", params: map[string]string{"options": "pgmfa.code=9"}, code: "9", options: del},
		{name: "other bare word", params: map[string]string{"options": "-c a=b foo"}, options: "-c a=b foo"},
		{name: "flag then -c", params: map[string]string{"options": "-e -c pgmfa.code=10"}, code: "10", options: "-e "},
		{name: "-c swallowing --", params: map[string]string{"options": "-c --pgmfa.code=11"}, code: "11", options: del},
		{name: "arg switch", params: map[string]string{"options": "-B 100 -c pgmfa.code=12"}, code: "12", options: "-B 100 "},
		{name: "empty code", params: map[string]string{"options": "-c pgmfa.code="}, options: del},
		{name: "others untouched", params: map[string]string{"user": "u", "database": "d", "application_name": "pgmfa.code"},
			options: del, extra: map[string]string{"user": "u", "database": "d", "application_name": "pgmfa.code"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := maps.Clone(c.params)
			code, err := StripMFACode(p)
			if err != nil {
				t.Fatal(err)
			}
			if code != c.code {
				t.Errorf("code = %q, want %q", code, c.code)
			}
			got, ok := p["options"]
			if c.options == del {
				if ok {
					t.Errorf("options = %q, want deleted", got)
				}
			} else if got != c.options {
				t.Errorf("options = %q, want %q", got, c.options)
			}
			for k := range p {
				if hasMFAPrefix(k) {
					t.Errorf("parameter %q left in", k)
				}
			}
			for k, v := range c.extra {
				if p[k] != v {
					t.Errorf("%s = %q, want %q", k, p[k], v)
				}
			}
		})
	}
}

func TestStripMFACodeConflict(t *testing.T) {
	for _, p := range []map[string]string{
		{"pgmfa.code": "111111", "options": "-c pgmfa.code=222222"},
		{"options": "-c pgmfa.code=1 --pgmfa.code=2"},
		{"options": "-cpgmfa.code=1 -c PGMFA.CODE=2"},
		{"options": "-ec pgmfa.code=1"}, // glued behind another switch: refused
		{"options": "-ecpgmfa.code=1"},
	} {
		_, err := StripMFACode(p)
		var ae *AuthError
		if !errors.As(err, &ae) || ae.Code != "28000" {
			t.Errorf("%v: err = %v, want AuthError 28000", p, err)
		}
	}
}

// TestStripMFAKeepsOrder: pgmfa's parameters go, everything else stays in
// the client's order, repeated names included; of repeated "options" each
// loses its pgmfa words, and an emptied last one stays (PostgreSQL reads
// only the last "options": dropping it would revive the one before).
func TestStripMFAKeepsOrder(t *testing.T) {
	for _, tc := range []struct {
		name     string
		in, want []StartupParam
		code     string
	}{
		{"order and case kept",
			[]StartupParam{{"user", "u"}, {"search_path", "a"}, {"PGMFA.code", "123456"}, {"SEARCH_PATH", "b"}, {"pgmfa.other", "x"}, {"user", "v"}},
			[]StartupParam{{"user", "u"}, {"search_path", "a"}, {"SEARCH_PATH", "b"}, {"user", "v"}}, "123456"},
		{"only options emptied: dropped",
			[]StartupParam{{"user", "u"}, {"options", "-c pgmfa.code=1"}, {"a", "b"}},
			[]StartupParam{{"user", "u"}, {"a", "b"}}, "1"},
		{"emptied last options stays",
			[]StartupParam{{"options", "-c search_path=x"}, {"user", "u"}, {"options", " -c pgmfa.code=1 "}},
			[]StartupParam{{"options", "-c search_path=x"}, {"user", "u"}, {"options", "  "}}, "1"},
		{"emptied earlier options goes",
			[]StartupParam{{"options", "-c pgmfa.code=1"}, {"user", "u"}, {"options", "-c geqo=off -c pgmfa.code=1"}},
			[]StartupParam{{"user", "u"}, {"options", "-c geqo=off "}}, "1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, code, err := StripMFA(tc.in)
			if err != nil || code != tc.code {
				t.Fatalf("code %q err %v", code, err)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("got %q, want %q", got, tc.want)
				}
			}
		})
	}
	if _, _, err := StripMFA([]StartupParam{{"options", "-c pgmfa.code=1"}, {"options", "-c pgmfa.code=2"}}); err == nil {
		t.Fatal("two different codes in two options accepted")
	}
}

// StripMFACode is StripMFA for parameters held in a map (one of each name),
// in place: the tests and FuzzStripMFACode state cases as maps.
func StripMFACode(params map[string]string) (code string, err error) {
	list := make([]StartupParam, 0, len(params))
	for k, v := range params {
		list = append(list, StartupParam{Name: k, Value: v})
	}
	kept, code, err := StripMFA(list)
	if err != nil {
		return "", err
	}
	clear(params)
	for _, p := range kept {
		params[p.Name] = p.Value
	}
	return code, nil
}
