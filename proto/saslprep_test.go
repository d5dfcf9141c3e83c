package proto

import "testing"

func TestSASLprep(t *testing.T) {
	for in, want := range map[string]string{
		"pencil":             "pencil",
		"I\u00ADX":           "IX",  // RFC 4013 §3: soft hyphen mapped to nothing
		"\u00AA":             "a",   // NFKC
		"\u2168":             "IX",  // NFKC
		"a\u00A0b":           "a b", // non-ASCII space
		"a\u3000b\u200Bc":    "a b c",
		"\x07bell":           "\x07bell",           // ASCII: as is, like PostgreSQL
		"\u00e9\x07":         "\u00e9\x07",         // prohibited control: raw
		"\u0627\u0031":       "\u0627\u0031",       // RFC 4013 §3: bidi violation: raw
		"\u0627\u0031\u0628": "\u0627\u0031\u0628", // valid RTL
		"x\uE000":            "x\uE000",            // private use: raw
		"\xff\xfe":           "\xff\xfe",           // not UTF-8: raw
		"\u00AD":             "\u00AD",             // maps to empty: raw
		"Caf\u0065\u0301":    "Caf\u00e9",          // NFC part of NFKC
	} {
		if got := saslPrep(in); got != want {
			t.Errorf("saslPrep(%q) = %q, want %q", in, got, want)
		}
	}
}
