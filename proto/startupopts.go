package proto

import "strings"

// MFACodeParam is the startup parameter (or "-c" option) that carries the
// TOTP code. Every parameter under the "pgmfa." prefix is the proxy's and is
// removed before the startup packet goes upstream.
const MFACodeParam = "pgmfa.code"

const mfaPrefix = "pgmfa."

// StripMFA removes pgmfa's parameters from a startup packet's parameters
// and returns the others, in their order and otherwise untouched, with the
// MFA code.
//
// The code may come as a bare "pgmfa.code" parameter, or inside "options" as
// "-c pgmfa.code=NNN", "-cpgmfa.code=NNN" or "--pgmfa.code=NNN". "options"
// is split the way PostgreSQL splits it (pg_split_opts: on unescaped
// whitespace, a backslash escapes the next byte) and its words are read the
// way the backend's getopt reads them; only the words that carry pgmfa
// settings are cut out and every other byte is kept exactly, so the
// database sees the options the client meant. An "options" left with
// nothing but whitespace is dropped — unless it is the last of several:
// PostgreSQL reads only the last "options", so dropping it would bring back
// one the client had overridden; it stays, emptied of pgmfa's words. Names
// are matched as PostgreSQL matches setting names: case-insensitively, with
// '-' read as '_'. Any other "pgmfa." parameter or option is removed too:
// none of them may reach the database, and neither may a stray
// "pgmfa.code=NNN" word (PostgreSQL would echo it in an error; it is taken
// as the code).
//
// Two different codes are an *AuthError (28000): guessing which one the
// client meant is not safe. So is a pgmfa setting glued behind other
// switches ("-ec pgmfa.code=1"), which could not be cut without rewriting
// the client's switches.
func StripMFA(params []StartupParam) (kept []StartupParam, code string, err error) {
	var codes []string
	lastOptions, nOptions := -1, 0
	for i, p := range params {
		if p.Name == "options" {
			lastOptions = i
			nOptions++
		}
	}
	kept = make([]StartupParam, 0, len(params))
	for i, p := range params {
		if hasMFAPrefix(p.Name) {
			if strings.EqualFold(p.Name, MFACodeParam) && p.Value != "" {
				codes = append(codes, p.Value)
			}
			continue
		}
		if p.Name == "options" {
			rest, found, err := stripOptions(p.Value)
			if err != nil {
				return nil, "", err
			}
			codes = append(codes, found...)
			if strings.TrimLeft(rest, " \t\n\v\f\r") == "" && !(i == lastOptions && nOptions > 1) {
				continue
			}
			p.Value = rest
		}
		kept = append(kept, p)
	}
	for _, c := range codes {
		if code != "" && c != code {
			return nil, "", &AuthError{
				Code:    CodeInvalidAuthorization,
				Message: "conflicting MFA codes in the startup packet",
				Hint:    "pass pgmfa.code once, either as a connection parameter or in PGOPTIONS",
			}
		}
		code = c
	}
	return kept, code, nil
}

func hasMFAPrefix(name string) bool {
	return len(name) >= len(mfaPrefix) && strings.EqualFold(name[:len(mfaPrefix)], mfaPrefix)
}

func isOptSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'
}

// optToken is one whitespace-separated word of "options": [start, end) in
// the original string, and its text with backslash escapes resolved.
type optToken struct {
	start, end int
	text       string
}

// splitOptions tokenises like PostgreSQL's pg_split_opts.
func splitOptions(s string) []optToken {
	var toks []optToken
	i := 0
	for {
		for i < len(s) && isOptSpace(s[i]) {
			i++
		}
		if i >= len(s) {
			return toks
		}
		start := i
		var b strings.Builder
		for i < len(s) && !isOptSpace(s[i]) {
			if s[i] == '\\' && i+1 < len(s) {
				i++
			}
			b.WriteByte(s[i])
			i++
		}
		toks = append(toks, optToken{start: start, end: i, text: b.String()})
	}
}

// mfaSetting reports whether a "name=value" (or bare "name") word from
// options names one of pgmfa's settings, and the code if it is pgmfa.code.
// Leading dashes are ignored so that a setting hidden behind a stray "-c"
// ("-c --pgmfa.code=1") is still caught: stripping too much is safe,
// letting a code through is not.
func mfaSetting(word string) (isMFA bool, code string) {
	name, value, _ := strings.Cut(word, "=")
	// PostgreSQL's ParseLongOption turns '-' into '_' in the name.
	name = strings.ReplaceAll(strings.TrimLeft(name, "-"), "-", "_")
	if !hasMFAPrefix(name) {
		return false, ""
	}
	if strings.EqualFold(name, MFACodeParam) {
		return true, value
	}
	return true, ""
}

// Switches of postgres(1) that a client may send in options
// (process_postgres_switches' getopt string "B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:").
const (
	switchesNoArg   = "bEeFijlnOPsT"
	switchesWithArg = "BCcDdfhkNprStvW-"
)

// stripOptions cuts pgmfa settings out of an options string. It reads the
// words the way the backend's getopt does, so a setting is found whether it
// is "-c name=v", "-cname=v", "--name=v" or an argument glued behind flags
// that take none ("-ec name=v"); the last form cannot be cut without
// rewriting the client's flags and is refused.
func stripOptions(opts string) (rest string, codes []string, err error) {
	toks := splitOptions(opts)
	type span struct{ start, end int }
	var cut []span
	take := func(word string, from, to int) {
		ok, code := mfaSetting(word)
		if !ok {
			return
		}
		if code != "" {
			codes = append(codes, code)
		}
		cut = append(cut, span{from, to})
	}
	for i := 0; i < len(toks); i++ {
		t := toks[i].text
		if len(t) < 2 || t[0] != '-' {
			// Not a switch: PostgreSQL refuses it and echoes it in the
			// error, so a pgmfa setting must not stay here either.
			take(t, toks[i].start, toks[i].end)
			continue
		}
		for j := 1; j < len(t); j++ {
			ch := t[j]
			if strings.IndexByte(switchesNoArg, ch) >= 0 {
				continue
			}
			if strings.IndexByte(switchesWithArg, ch) < 0 {
				break // unknown switch: PostgreSQL refuses the packet
			}
			arg, to, next := t[j+1:], toks[i].end, false
			if arg == "" {
				if i+1 >= len(toks) {
					break // "-c" at the end: PostgreSQL refuses it
				}
				arg, to, next = toks[i+1].text, toks[i+1].end, true
			}
			if ok, _ := mfaSetting(arg); ok && j > 1 {
				return "", nil, &AuthError{Code: CodeInvalidAuthorization,
					Message: "pgmfa settings must not be combined with other switches in options",
					Hint:    "pass the code as a separate -c pgmfa.code=NNNNNN"}
			}
			take(arg, toks[i].start, to)
			if next {
				i++ // the next word was this switch's argument
			}
			break
		}
	}
	if len(cut) == 0 {
		return opts, nil, nil
	}
	var b strings.Builder
	prev := 0
	for _, c := range cut {
		b.WriteString(opts[prev:c.start])
		prev = c.end
	}
	b.WriteString(opts[prev:])
	return b.String(), codes, nil
}
