package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
)

func init() {
	register("enroll", "enroll a user for TOTP: write its secret to the store and show the QR code", runEnroll)
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
	remove := fs.Bool("remove", false, "remove USER from the store instead of enrolling")
	showQR := fs.Bool("qr", true, "print a QR code of the otpauth:// URI to scan with the app")
	qrLight := fs.Bool("qr-light-terminal", false, "draw the QR code for a terminal with dark text on a light background")
	printSecret := fs.Bool("print-secret", false, "also print the bare base32 secret, for apps where it is typed in by hand")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `usage: pgmfa enroll [flags] USER
       pgmfa enroll --remove [--store PATH] USER

Creates a TOTP secret for the database user USER, writes it to the store
(mode 0600) and prints the otpauth:// URI and a QR code to scan with an
authenticator app. The URI and the QR code are the secret: show them only
to USER. A running pgmfa reads the store at start and on SIGHUP.

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

	s, err := openStore(*store, *keyFile)
	if err != nil {
		fmt.Fprintln(stderr, "pgmfa enroll:", err)
		return 1
	}
	defer s.Close()
	if *remove {
		if err := s.Remove(user); err != nil {
			fmt.Fprintln(stderr, "pgmfa enroll:", err)
			return 1
		}
		fmt.Fprintf(stdout, "Removed %q from %s.\n%s", user, s, reloadNoteFor(s))
		return 0
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
