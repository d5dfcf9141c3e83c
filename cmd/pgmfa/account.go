package main

import (
	"bufio"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto"
)

func init() {
	register("account", "manage the accounts pgmfa authenticates itself (--auth accounts): add, passwd, remove, list", runAccount)
}

// accountStore is what `pgmfa account` and `serve --auth accounts` need of
// a store's accounts.
type accountStore interface {
	AddAccount(name string, rec mfa.AccountRecord) error
	SetAccountVerifier(name, verifier string) error
	RemoveAccount(name string) error
	ListAccounts() ([]string, error)
	GetAccount(name string) (mfa.AccountRecord, bool, error)
	AccountsSecret() ([]byte, error)
}

func (f *fileStore) ListAccounts() ([]string, error) { return f.AccountNames(), nil }
func (f *fileStore) GetAccount(name string) (mfa.AccountRecord, bool, error) {
	a, ok := f.LookupAccount(name)
	return a, ok, nil
}
func (f *fileStore) AccountsSecret() ([]byte, error) { return f.AccountSecret(), nil }

// accountsOf returns the accounts of a store, or an error saying the store
// cannot hold them.
func accountsOf(s mfaStore) (accountStore, error) {
	if a, ok := s.(accountStore); ok {
		return a, nil
	}
	return nil, fmt.Errorf("the store %s cannot hold accounts (a file store can)", s)
}

// defaultSCRAMIterations is PostgreSQL's scram_iterations default.
const defaultSCRAMIterations = 4096

func runAccount(args []string) int { return accountCmd(args, os.Stdin, os.Stdout, os.Stderr) }

const accountUsage = `usage: pgmfa account add    [flags] USER   (--role ROLE, --db-password-file FILE, --scram-iterations N, --md5)
       pgmfa account passwd [flags] USER   (--scram-iterations N, --md5)
       pgmfa account remove [flags] USER
       pgmfa account list   [flags]
       pgmfa account import [flags] --userlist FILE   (--role ROLE, --db-password-file FILE)

Accounts are the people pgmfa authenticates itself with --auth accounts:
each has its own password (stored as a SCRAM-SHA-256 verifier, or MD5 with
--md5; never the password itself) and maps to a database role that pgmfa
logs in as with a password only pgmfa holds (stored encrypted: a
--store-key-file is required for it). The password is asked for twice on a
terminal, or read as one line from standard input.

import reads a pgbouncer userlist.txt: SCRAM-SHA-256 and MD5 entries are
stored as they are (so the passwords people have keep working; MD5 ones
need --account-method md5), plaintext entries are turned into SCRAM
verifiers. Every account maps to --role (default: its own name). An
account that already exists stops the import before anything is written.
`

// accountCmd is `pgmfa account`, with its streams injected for tests.
func accountCmd(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		fmt.Fprint(stderr, accountUsage)
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help") {
			return 0
		}
		return 2
	}
	verb := args[0]
	fs := flag.NewFlagSet("account "+verb, flag.ContinueOnError)
	fs.SetOutput(stderr)
	store := fs.String("store", defaultStorePath(), storeUsage)
	keyFile := fs.String("store-key-file", defaultKeyFile(), keyFileUsage)
	var role, dbPasswordFile, userlistFile *string
	var iterations *int
	var md5 *bool
	switch verb {
	case "import":
		userlistFile = fs.String("userlist", "", "pgbouncer auth_file (userlist.txt) to import")
		role = fs.String("role", "", "database role every imported account logs in as (default: each account's own name)")
		dbPasswordFile = fs.String("db-password-file", "", "file whose first line is that role's database password")
		iterations = fs.Int("scram-iterations", defaultSCRAMIterations, "SCRAM-SHA-256 iteration count of the verifiers made for plaintext entries")
	case "add":
		role = fs.String("role", "", "database role the account logs in as (default: the account's name)")
		dbPasswordFile = fs.String("db-password-file", "", "file whose first line is the role's database password, which pgmfa sends upstream (omit when the database asks pgmfa for none, e.g. trust or cert on its side)")
		fallthrough
	case "passwd":
		iterations = fs.Int("scram-iterations", defaultSCRAMIterations, "SCRAM-SHA-256 iteration count of the verifier (PostgreSQL's default is 4096; more is slower to crack and to log in)")
		md5 = fs.Bool("md5", false, "store an MD5 verifier instead of SCRAM-SHA-256, for clients that cannot do SCRAM (serve with --account-method md5); MD5 is weak, avoid it")
	case "remove", "list":
	default:
		fmt.Fprintf(stderr, "pgmfa account: unknown command %q\n\n%s", verb, accountUsage)
		return 2
	}
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), accountUsage+"\nflags:\n")
		fs.PrintDefaults()
	}
	pos, err := parseMixed(fs, args[1:])
	if err != nil {
		return flagExit(err)
	}
	if (verb == "list" || verb == "import") != (len(pos) == 0) || len(pos) > 1 {
		fs.Usage()
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "pgmfa account %s: %v\n", verb, err)
		return 1
	}
	s, err := openStore(*store, *keyFile)
	if err != nil {
		return fail(err)
	}
	defer s.Close()
	accts, err := accountsOf(s)
	if err != nil {
		return fail(err)
	}
	if verb == "import" {
		return importUserlist(accts, *userlistFile, *role, *dbPasswordFile, *iterations, stdout, stderr, s.String())
	}
	if verb == "list" {
		names, err := accts.ListAccounts()
		if err != nil {
			return fail(err)
		}
		for _, n := range names {
			a, ok, err := accts.GetAccount(n)
			if err != nil || !ok {
				continue
			}
			kind := "scram-sha-256"
			if strings.HasPrefix(a.Verifier, "md5") {
				kind = "md5"
			}
			fmt.Fprintf(stdout, "%s\trole=%s\tverifier=%s\n", n, a.Role, kind)
		}
		return 0
	}
	name := pos[0]
	switch verb {
	case "remove":
		if err := accts.RemoveAccount(name); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "Removed account %q from %s.\n%s", name, s, reloadNote)
		return 0
	case "passwd":
		if _, ok, err := accts.GetAccount(name); err != nil || !ok {
			if err == nil {
				err = fmt.Errorf("account %q: %w", name, mfa.ErrNoAccount)
			}
			return fail(err)
		}
	}
	rec := mfa.AccountRecord{}
	if verb == "add" {
		if err := mfa.ValidAccountName(name); err != nil {
			return fail(err)
		}
		// Fail before asking for a password the store would refuse.
		if _, ok, err := accts.GetAccount(name); err != nil || ok {
			if err == nil {
				err = fmt.Errorf("account %q: %w", name, mfa.ErrAccountExists)
			}
			return fail(err)
		}
		rec.Role = *role
		if rec.Role == "" {
			rec.Role = name
		}
		if *dbPasswordFile != "" {
			if rec.DBPassword, err = readFirstLine(*dbPasswordFile); err != nil {
				return fail(err)
			}
		}
	}
	if *iterations < 1 || *iterations > 1<<24 {
		return fail(errors.New("--scram-iterations must be between 1 and 16777216"))
	}
	password, err := readNewPassword(stdin, stderr, name)
	if err != nil {
		return fail(err)
	}
	if rec.Verifier, err = makeVerifier(name, password, *iterations, *md5); err != nil {
		return fail(err)
	}
	if verb == "add" {
		err = accts.AddAccount(name, rec)
	} else {
		err = accts.SetAccountVerifier(name, rec.Verifier)
	}
	if err != nil {
		return fail(err)
	}
	if verb == "add" {
		fmt.Fprintf(stdout, "Added account %q (database role %q) to %s.\n%s", name, rec.Role, s, reloadNote)
	} else {
		fmt.Fprintf(stdout, "Changed the password of account %q in %s.\n%s", name, s, reloadNote)
	}
	return 0
}

// makeVerifier turns a password into the verifier stored for it.
func makeVerifier(name, password string, iterations int, md5 bool) (string, error) {
	if md5 {
		return proto.NewMD5Verifier(name, password), nil
	}
	salt := make([]byte, 16) // PostgreSQL's SCRAM_DEFAULT_SALT_LEN
	if _, err := rand.Read(salt); err != nil {
		return "", err
	}
	return proto.NewSCRAMVerifier(password, salt, iterations), nil
}

// readNewPassword asks for the password twice without echo when stdin is a
// terminal, else reads one line (scripts: `echo "$pw" | pgmfa account add`).
func readNewPassword(stdin io.Reader, stderr io.Writer, name string) (string, error) {
	if f, ok := stdin.(*os.File); ok {
		if _, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS); err == nil {
			fmt.Fprintf(stderr, "Password for account %s: ", name)
			a, err := readNoEcho(f)
			if err != nil {
				return "", err
			}
			fmt.Fprint(stderr, "Again: ")
			b, err := readNoEcho(f)
			if err != nil {
				return "", err
			}
			if a != b {
				return "", errors.New("the passwords differ")
			}
			return checkPassword(a)
		}
	}
	line, err := bufio.NewReader(stdin).ReadString('\n')
	if err != nil && !(errors.Is(err, io.EOF) && line != "") {
		return "", errors.New("no password on standard input")
	}
	return checkPassword(strings.TrimRight(line, "\r\n"))
}

func checkPassword(pw string) (string, error) {
	if pw == "" {
		return "", errors.New("empty password")
	}
	if strings.ContainsRune(pw, 0) {
		return "", errors.New("the password contains a NUL byte")
	}
	return pw, nil
}

// readNoEcho reads one line from the terminal f with echo off.
func readNoEcho(f *os.File) (string, error) {
	fd := int(f.Fd())
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return "", err
	}
	quiet := *old
	quiet.Lflag &^= unix.ECHO
	quiet.Lflag |= unix.ICANON | unix.ISIG
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &quiet); err != nil {
		return "", err
	}
	defer func() {
		_ = unix.IoctlSetTermios(fd, unix.TCSETS, old)
		fmt.Fprintln(os.Stderr)
	}()
	var line []byte
	b := make([]byte, 1)
	for {
		n, err := f.Read(b)
		if n == 1 {
			if b[0] == '\n' {
				break
			}
			line = append(line, b[0])
		}
		if err != nil {
			return "", err
		}
	}
	return strings.TrimRight(string(line), "\r"), nil
}

// readFirstLine reads the first line of a credential file, which must not
// be open to group or others.
func readFirstLine(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("%s is accessible to group or others (mode %04o); chmod 600 it", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	line = strings.TrimRight(line, "\r")
	if line == "" {
		return "", fmt.Errorf("%s: empty first line", path)
	}
	return line, nil
}
