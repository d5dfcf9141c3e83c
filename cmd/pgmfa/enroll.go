package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
)

func init() {
	register("enroll", "enroll a user for TOTP: write its secret to the store and show the QR code; --webauthn: a link to register a passkey", runEnroll)
}

// defaultStorePath is the TOTP store unless --store says otherwise:
// $PGMFA_STORE, else /var/lib/pgmfa/totp.json.
func defaultStorePath() string {
	if p := os.Getenv("PGMFA_STORE"); p != "" {
		return p
	}
	return "/var/lib/pgmfa/totp.json"
}

func runEnroll(args []string) int { return enroll(args, os.Stdout, os.Stderr) }

// enroll is `pgmfa enroll`, with its output streams injected for tests.
func enroll(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("enroll", flag.ContinueOnError)
	fs.SetOutput(stderr)
	store := fs.String("store", defaultStorePath(), "TOTP secret store to write: a file (created with mode 0600, its directory 0700) or a PostgreSQL connection string (env PGMFA_STORE)")
	keyFile := fs.String("store-key-file", defaultKeyFile(), keyFileUsage)
	issuer := fs.String("issuer", mfa.DefaultIssuer, "issuer name the authenticator app shows next to the user")
	digits := fs.Int("digits", mfa.DefaultDigits, "code length: 6 or 8 (most apps support both)")
	period := fs.Duration("period", mfa.DefaultPeriod, "how often the code changes, whole seconds (apps other than 30s support vary)")
	algorithm := fs.String("algorithm", mfa.DefaultAlgorithm, "HMAC: SHA1 (every app), SHA256 or SHA512 (some apps ignore these and show wrong codes)")
	force := fs.Bool("force", false, "replace the secret of a user who is already enrolled (rotation: the old authenticator entry stops working)")
	remove := fs.Bool("remove", false, "remove USER (with its passkeys) from the store instead of enrolling; with --webauthn only USER's passkeys")
	webauthn := fs.Bool("webauthn", false, "instead of a TOTP secret, make a single-use link where USER, already enrolled for TOTP, registers a passkey or security key on the approval page (pgmfa serve --web)")
	webURL := fs.String("web-url", os.Getenv("PGMFA_WEB_URL"), "the approval page's address as users reach it (as pgmfa serve --web-url), for --webauthn links (env PGMFA_WEB_URL)")
	expires := fs.Duration("expires", defaultLinkExpiry, "how long a --webauthn link stays valid (at most 24h)")
	showQR := fs.Bool("qr", true, "print a QR code of the otpauth:// URI to scan with the app")
	qrLight := fs.Bool("qr-light-terminal", false, "draw the QR code for a terminal with dark text on a light background")
	printSecret := fs.Bool("print-secret", false, "also print the bare base32 secret, for apps where it is typed in by hand")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `usage: pgmfa enroll [flags] USER
       pgmfa enroll --webauthn --web-url URL [--expires 15m] [--store PATH] USER
       pgmfa enroll --remove [--webauthn] [--store PATH] USER

Creates a TOTP secret for the database user USER, writes it to the store
(mode 0600) and prints the otpauth:// URI and a QR code to scan with an
authenticator app. The URI and the QR code are the secret: show them only
to USER. A running pgmfa reads the store at start and on SIGHUP.

With --webauthn it prints a link, URL/enroll/TOKEN, where USER (enrolled
for TOTP already) registers a passkey or security key on the approval page
that pgmfa serve --web serves; the passkey then signs USER in on the page
in place of a code. The link works once, until --expires, and is valid at
once (no SIGHUP); only its SHA-256 is stored. --remove --webauthn removes
USER's passkeys and open links and keeps the TOTP enrollment.

flags:
`)
		fs.PrintDefaults()
	}
	pos, err := parseMixed(fs, args)
	if err != nil {
		return flagExit(err)
	}
	if len(pos) != 1 {
		fs.Usage()
		return 2
	}
	user := pos[0]
	if err := checkEnrollFlags(fs, *webauthn, *remove); err != nil {
		fmt.Fprintln(stderr, "pgmfa enroll:", err)
		return 2
	}
	var base *url.URL
	if *webauthn && !*remove {
		if base, err = linkBase(*webURL, *expires); err != nil {
			fmt.Fprintln(stderr, "pgmfa enroll:", err)
			return 2
		}
	}

	s, err := openStore(*store, *keyFile)
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa enroll:", err)
		return 1
	}
	defer s.Close()
	switch {
	case *remove && *webauthn:
		n, err := s.RemovePasskeys(user)
		if err != nil {
			fmt.Fprintln(stderr, "pgmfa enroll:", err)
			return 1
		}
		fmt.Fprintf(stdout, "Removed %d passkey(s) of %q and its open enrollment links from %s; its TOTP enrollment stays. Every pgmfa sees the change at once.\n", n, user, s)
		return 0
	case *remove:
		// Counted before: the removal takes the passkeys with the user.
		pks, _ := s.UserPasskeys(user)
		if err := s.Remove(user); err != nil {
			fmt.Fprintln(stderr, "pgmfa enroll:", err)
			return 1
		}
		also := ""
		if len(pks) > 0 {
			also = fmt.Sprintf(" with its %d passkey(s)", len(pks))
		}
		fmt.Fprintf(stdout, "Removed %q%s from %s.\n%s", user, also, s, reloadNoteFor(s))
		return 0
	case *webauthn:
		return enrollLink(s, user, base, *expires, *keyFile, stdout, stderr)
	}
	existed := false
	if _, ok := s.Secret(user); ok {
		existed = true
	}
	key, err := s.Enroll(user, mfa.EnrollOptions{Issuer: *issuer, Digits: *digits, Period: *period, Algorithm: *algorithm}, *force)
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa enroll:", err)
		return 1
	}

	verb := "Enrolled"
	if existed {
		verb = "Rotated the secret of"
	}
	fmt.Fprintf(stdout, "%s %q in %s (TOTP %s, %d digits, every %v).\n", verb, user, s,
		key.Algorithm(), key.Digits().Length(), time.Duration(key.Period())*time.Second)
	if existed {
		fmt.Fprintln(stdout, "The old authenticator entry no longer works; scan the new one.")
	}
	if *showQR {
		fmt.Fprintln(stdout, "\nScan this with an authenticator app:")
		if err := mfa.WriteQRCode(stdout, key.URL(), mfa.QROptions{DarkOnLight: *qrLight}); err != nil {
			// The URI below still works; say why the picture is missing.
			fmt.Fprintln(stderr, "pgmfa enroll: no QR code:", err)
		}
	}
	fmt.Fprintf(stdout, "\nor open this URI on the device:\n%s\n", key.URL())
	if *printSecret {
		fmt.Fprintf(stdout, "\nsecret (to type in by hand): %s\n", key.Secret())
	}
	fmt.Fprintf(stdout, "\n%s", reloadNoteFor(s))
	if note := plaintextNote(s, *keyFile); note != "" {
		fmt.Fprintln(stderr, "pgmfa enroll: warning:", note)
	}
	return 0
}

// defaultLinkExpiry is how long a --webauthn link is valid unless
// --expires says otherwise: time to pass it on and open it, short enough
// that a forgotten one is dead soon.
const defaultLinkExpiry = 15 * time.Minute

// maxLinkExpiry bounds --expires: a link is a credential to register a
// passkey as USER, not something to keep.
const maxLinkExpiry = 24 * time.Hour

// checkEnrollFlags refuses flags that the chosen mode would ignore, so a
// command line never looks as if it did something it did not.
func checkEnrollFlags(fs *flag.FlagSet, webauthn, remove bool) error {
	var err error
	fs.Visit(func(f *flag.Flag) {
		if err != nil {
			return
		}
		switch f.Name {
		case "web-url", "expires":
			if !webauthn || remove {
				err = fmt.Errorf("--%s is for making a link: pgmfa enroll --webauthn --%s … USER", f.Name, f.Name)
			}
		case "force", "issuer", "digits", "period", "algorithm", "print-secret", "qr", "qr-light-terminal":
			if webauthn || remove {
				err = fmt.Errorf("--%s is for enrolling a TOTP secret; it does nothing with --webauthn or --remove", f.Name)
			}
		}
	})
	return err
}

// linkBase checks --web-url and --expires for a --webauthn link.
func linkBase(webURL string, expires time.Duration) (*url.URL, error) {
	if webURL == "" {
		return nil, errors.New("--webauthn needs --web-url (or PGMFA_WEB_URL): the approval page's address as users reach it, the --web-url of pgmfa serve --web")
	}
	u, err := url.Parse(webURL)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return nil, fmt.Errorf("--web-url must be the approval page's http(s)://HOST[:PORT][/PATH] without query or credentials, not %q", webURL)
	}
	if expires <= 0 || expires > maxLinkExpiry {
		return nil, fmt.Errorf("--expires %v: a link is valid for more than 0 and at most %v", expires, maxLinkExpiry)
	}
	return u, nil
}

// enrollLink is `pgmfa enroll --webauthn`: a fresh token, its hash stored
// for user, the link printed with what it does.
func enrollLink(s mfaStore, user string, base *url.URL, expires time.Duration, keyFile string, stdout, stderr io.Writer) int {
	token, hash, err := mfa.NewPasskeyLinkToken()
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa enroll:", err)
		return 1
	}
	until := time.Now().Add(expires)
	if err := s.AddPasskeyLink(user, hash, until); err != nil {
		if errors.Is(err, mfa.ErrNotEnrolled) {
			fmt.Fprintf(stderr, "pgmfa enroll: enroll %s for TOTP first: pgmfa enroll %s (a passkey is a second way to sign in on the approval page, added to a TOTP enrollment)\n", user, user)
			return 1
		}
		fmt.Fprintln(stderr, "pgmfa enroll:", err)
		return 1
	}
	link := strings.TrimRight(base.String(), "/") + "/enroll/" + token
	fmt.Fprintf(stdout, `Passkey enrollment link for %q in %s:

  %s

Give it to %s only. Opened on the approval page, it registers a passkey or
security key that then signs %s in on that page in place of a code from
the authenticator app. It works once, and until %s (%v).
Every pgmfa on this store accepts it at once; the page is served by
pgmfa serve --web (at %s). Remove the passkeys with:
pgmfa enroll --remove --webauthn %s
`, user, s, link, user, user, until.UTC().Format("2006-01-02 15:04:05 UTC"), expires, base, user)
	if note := plaintextNote(s, keyFile); note != "" {
		fmt.Fprintln(stderr, "pgmfa enroll: warning:", note)
	}
	return 0
}

// reloadNoteFor is reloadNote for a file store; a PostgreSQL store is read
// at every login, so nothing needs reloading.
func reloadNoteFor(s mfaStore) string {
	if _, ok := s.(*pgStore); ok {
		return "Every pgmfa on this store sees the change at the next login.\n"
	}
	return reloadNote
}

const reloadNote = "A running pgmfa picks up the change on SIGHUP: kill -HUP $(pidof pgmfa)\n"

// parseMixed parses flags that may come before or after the positional
// arguments (`pgmfa enroll alice --force` as well as `--force alice`), which
// flag.Parse alone does not; "--" ends the flags.
func parseMixed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if len(args) > len(rest) && args[len(args)-len(rest)-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}
