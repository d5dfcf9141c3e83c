package proto

import (
	"strings"
	"unicode/utf8"

	"golang.org/x/text/unicode/bidi"
	"golang.org/x/text/unicode/norm"
)

// saslPrep prepares a password for SCRAM the way PostgreSQL does
// (src/common/saslprep.c, RFC 4013): ASCII passwords are used as they are;
// others have non-ASCII spaces mapped to U+0020, "commonly mapped to
// nothing" characters removed, NFKC applied, and are then checked for
// prohibited characters and bidirectional rules. Where PostgreSQL would
// refuse the prepared form it uses the raw bytes instead, and so does this.
//
// Not implemented: the "unassigned in Unicode 3.2" check (RFC 3454 A.1),
// which only matters for passwords using code points newer than 2002.
func saslPrep(password string) string {
	ascii := true
	for i := 0; i < len(password); i++ {
		if password[i] >= 0x80 {
			ascii = false
			break
		}
	}
	if ascii || !utf8.ValidString(password) {
		return password
	}
	var b strings.Builder
	for _, r := range password {
		switch {
		case inRanges(r, nonASCIISpace):
			b.WriteByte(' ')
		case inRanges(r, mappedToNothing):
		default:
			b.WriteRune(r)
		}
	}
	out := norm.NFKC.String(b.String())
	if out == "" {
		return password
	}
	var randAL, l bool
	first, last := rune(-1), rune(-1)
	for _, r := range out {
		if inRanges(r, nonASCIISpace) || inRanges(r, prohibited) || r&0xfffe == 0xfffe {
			return password
		}
		p, _ := bidi.LookupRune(r)
		isRAL := p.Class() == bidi.R || p.Class() == bidi.AL
		randAL = randAL || isRAL
		l = l || p.Class() == bidi.L
		if first < 0 {
			first = r
		}
		last = r
	}
	if randAL {
		// RFC 3454 §6: no L characters, and RandALCat first and last.
		pf, _ := bidi.LookupRune(first)
		pl, _ := bidi.LookupRune(last)
		isRAL := func(p bidi.Properties) bool { return p.Class() == bidi.R || p.Class() == bidi.AL }
		if l || !isRAL(pf) || !isRAL(pl) {
			return password
		}
	}
	return out
}

type runeRange struct{ lo, hi rune }

func inRanges(r rune, rs []runeRange) bool {
	for _, x := range rs {
		if r >= x.lo && r <= x.hi {
			return true
		}
	}
	return false
}

// RFC 3454 C.1.2: non-ASCII space characters.
var nonASCIISpace = []runeRange{{0x00A0, 0x00A0}, {0x1680, 0x1680}, {0x2000, 0x200B}, {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000}}

// RFC 3454 B.1: commonly mapped to nothing.
var mappedToNothing = []runeRange{{0x00AD, 0x00AD}, {0x034F, 0x034F}, {0x1806, 0x1806}, {0x180B, 0x180D},
	{0x200B, 0x200D}, {0x2060, 0x2060}, {0xFE00, 0xFE0F}, {0xFEFF, 0xFEFF}}

// RFC 3454 C.2.1-C.9 (C.4's per-plane xFFFE/xFFFF are checked separately).
var prohibited = []runeRange{
	{0x0000, 0x001F}, {0x007F, 0x009F}, // C.2.1, C.2.2
	{0x06DD, 0x06DD}, {0x070F, 0x070F}, {0x180E, 0x180E}, {0x200C, 0x200F}, {0x2028, 0x202E},
	{0x2060, 0x2063}, {0x206A, 0x206F}, {0xFEFF, 0xFEFF}, {0xFFF9, 0xFFFD}, {0x1D173, 0x1D17A},
	{0xE000, 0xF8FF}, {0xF0000, 0xFFFFD}, {0x100000, 0x10FFFD}, // C.3
	{0xFDD0, 0xFDEF},                       // C.4
	{0xD800, 0xDFFF},                       // C.5
	{0x2FF0, 0x2FFB},                       // C.7
	{0x0340, 0x0341},                       // C.8
	{0xE0001, 0xE0001}, {0xE0020, 0xE007F}, // C.9
}
