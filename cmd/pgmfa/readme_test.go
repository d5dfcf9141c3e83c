package main

import (
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/pgmfa/pgmfa/mfa"
)

// TestMain lets a test run this very binary as pgmfa: with PGMFA_RUN_MAIN
// set, the test binary is the command (its arguments after "--").
func TestMain(m *testing.M) {
	if os.Getenv("PGMFA_RUN_MAIN") != "" {
		args := os.Args[1:]
		if i := slices.Index(args, "--"); i >= 0 {
			args = args[i+1:]
		}
		os.Exit(dispatch(args))
	}
	os.Exit(m.Run())
}

// pgmfa runs the command with args and returns its stdout and stderr.
func pgmfa(t *testing.T, args ...string) (string, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^$", "--"}, args...)...)
	cmd.Env = append(os.Environ(), "PGMFA_RUN_MAIN=1")
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("pgmfa %s: %v\n%s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), errb.String()
}

// readmeSection returns the README text under the heading line head, up
// to the next heading of the same or a higher level.
func readmeSection(t *testing.T, head string) string {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "\n"+head+"\n")
	if i < 0 {
		t.Fatalf("README has no section %q", head)
	}
	s = s[i+len(head)+2:]
	if j := strings.Index(s, "\n## "); j >= 0 {
		s = s[:j]
	}
	return s
}

// firstCells returns the first cell of every row of the markdown tables in
// text, header and separator rows left out.
func firstCells(text string) []string {
	var cells []string
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, "|") || strings.HasPrefix(line, "|---") {
			continue
		}
		cells = append(cells, strings.TrimSpace(strings.Split(line, "|")[1]))
	}
	if len(cells) > 0 {
		cells = cells[1:] // the header
	}
	return cells
}

// TestReadmeServeFlags: the README's table of serve flags names exactly the
// flags `pgmfa serve --help` lists.
func TestReadmeServeFlags(t *testing.T) {
	_, help := pgmfa(t, "serve", "--help")
	var inHelp []string
	for _, m := range regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`).FindAllStringSubmatch(help, -1) {
		inHelp = append(inHelp, m[1])
	}
	if len(inHelp) < 10 {
		t.Fatalf("found only %d flags in serve --help:\n%s", len(inHelp), help)
	}
	var inReadme []string
	for _, cell := range firstCells(readmeSection(t, "## `serve` flags")) {
		for _, m := range regexp.MustCompile("`--([a-z0-9-]+)`").FindAllStringSubmatch(cell, -1) {
			inReadme = append(inReadme, m[1])
		}
	}
	for _, f := range inHelp {
		if !slices.Contains(inReadme, f) {
			t.Errorf("--%s is in serve --help but not in README's serve flags table", f)
		}
	}
	for _, f := range inReadme {
		if !slices.Contains(inHelp, f) {
			t.Errorf("--%s is in README's serve flags table but not in serve --help", f)
		}
	}
}

// TestHelpFlagLines: every flag line of every subcommand's --help is the
// flag and at most its type. The flag package takes a `quoted` word of a
// usage text as the argument's name, so a usage that quotes a command
// printed "-auth pgmfa account add" instead of "-auth string".
func TestHelpFlagLines(t *testing.T) {
	for _, args := range [][]string{{"serve"}, {"approve"}, {"sessions"}, {"enroll"}, {"code"},
		{"store", "init"}, {"store", "new-key"}, {"store", "rotate-key"}, {"store", "migrate"},
		{"account", "add"}, {"account", "passwd"}, {"account", "remove"}, {"account", "list"}, {"account", "import"}} {
		_, help := pgmfa(t, append(args, "--help")...)
		lines := regexp.MustCompile(`(?m)^  -[a-z0-9-]+.*$`).FindAllString(help, -1)
		if len(lines) == 0 {
			t.Errorf("pgmfa %s --help lists no flag:\n%s", strings.Join(args, " "), help)
		}
		for _, l := range lines {
			if f := strings.Fields(l); len(f) > 2 {
				t.Errorf("pgmfa %s --help: %q names its argument from the usage text", strings.Join(args, " "), l)
			}
		}
	}
}

// TestReadmeSubcommands: `pgmfa help` lists every subcommand, and the
// README's table of subcommands names the same ones.
func TestReadmeSubcommands(t *testing.T) {
	help, _ := pgmfa(t, "help")
	var inHelp []string
	for _, m := range regexp.MustCompile(`(?m)^  ([a-z]+) `).FindAllStringSubmatch(help, -1) {
		inHelp = append(inHelp, m[1])
	}
	for name := range subcommands {
		if !slices.Contains(inHelp, name) {
			t.Errorf("pgmfa help does not list %s:\n%s", name, help)
		}
	}
	var inReadme []string
	for _, cell := range firstCells(readmeSection(t, "## Subcommands")) {
		m := regexp.MustCompile("^`pgmfa \\[?([a-z]+)").FindStringSubmatch(cell)
		if m == nil {
			t.Errorf("README subcommand row %q does not start with `pgmfa NAME", cell)
			continue
		}
		inReadme = append(inReadme, m[1])
	}
	slices.Sort(inHelp)
	slices.Sort(inReadme)
	if !slices.Equal(inHelp, inReadme) {
		t.Errorf("pgmfa help lists %v, README's subcommand table %v", inHelp, inReadme)
	}
}

// TestSkewFlag: --totp-skew 0 means the current step only (mfa.NoSkew, not
// the zero value that stands for the default), and a negative skew is
// refused with the flag's name.
func TestSkewFlag(t *testing.T) {
	for _, tc := range []struct {
		flag, want int
	}{{0, mfa.NoSkew}, {1, 1}, {3, 3}} {
		if got, err := skewOption(tc.flag); err != nil || got != tc.want {
			t.Errorf("--totp-skew %d: got %d, %v; want %d", tc.flag, got, err, tc.want)
		}
	}
	if _, err := skewOption(-1); err == nil || !strings.Contains(err.Error(), "--totp-skew") {
		t.Errorf("--totp-skew -1: %v", err)
	}
}
