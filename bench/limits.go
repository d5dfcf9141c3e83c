package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Holding -sessions sessions needs descriptors in three processes: the
// proxy (two per held session: client and database; pgmfa's default
// --max-conns counts three, for the moment a dial holds a third), pgbouncer
// (two) and this process (one per client). Every one of them inherits this
// process's RLIMIT_NOFILE, and a Go child raises its soft limit to the hard
// one at start, so the hard limit is what matters. PostgreSQL needs none
// per session in the postmaster (each backend has its own table).
//
// fdsPerSession is pgmfa's per-connection count; fdSlack covers everything
// else (the proxy's reserve, listeners, logs, the runtime, logins on their
// way in).
const (
	fdsPerSession = 3
	fdSlack       = 4096
	// heldFds and heldSlack are what holding the sessions takes at least:
	// two per session and pgmfa's own reserve (loop.fdReserve, ~200 on a
	// small machine) with room for the logins in flight.
	heldFds   = 2
	heldSlack = 512
)

// fileLimit is what raiseFileLimit arranged.
type fileLimit struct {
	// Log is a line for the log ("" when nothing had to change).
	Log string
	// MaxConns, when not 0, is the --max-conns every pgmfa needs to hold
	// the sessions: the limit could not be raised to what pgmfa's default
	// (a third of the limit) needs, but two descriptors per session fit.
	MaxConns int
}

// raiseFileLimit raises this process's open-file limit (soft and hard) so
// that sessions held sessions fit in every process the suite starts after
// it; the children inherit it. Raising the hard limit needs
// CAP_SYS_RESOURCE (root in a container may lack it); it is capped at
// fs.nr_open. When it cannot be raised far enough for pgmfa's default
// --max-conns but the sessions fit at two descriptors each, MaxConns says
// what to pass. An error means the sessions cannot fit in one process on
// this machine.
func raiseFileLimit(sessions int) (fileLimit, error) {
	need := uint64(fdsPerSession*sessions + fdSlack)
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return fileLimit{}, err
	}
	if rl.Cur >= need && rl.Max >= need {
		return fileLimit{}, nil
	}
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n < need {
			need = n
		}
	}
	old := rl
	want := unix.Rlimit{Cur: need, Max: max(rl.Max, need)}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &want); err == nil {
		return fileLimit{Log: fmt.Sprintf("open-file limit raised from %d (hard %d) to %d for -sessions %d", old.Cur, old.Max, need, sessions)}, nil
	} else if rl.Cur < rl.Max {
		// The soft limit at least, for this process (a Go child raises
		// its own).
		rl.Cur = rl.Max
		_ = unix.Setrlimit(unix.RLIMIT_NOFILE, &rl)
	}
	held := uint64(heldFds*sessions + heldSlack)
	if held > rl.Max {
		return fileLimit{}, fmt.Errorf("-sessions %d needs at least %d open files in one process (two per session); the hard limit is %d and cannot be raised here (needs CAP_SYS_RESOURCE): at most -sessions %d",
			sessions, held, rl.Max, (int(rl.Max)-heldSlack)/heldFds)
	}
	mc := sessions + heldSlack/8
	return fileLimit{
		Log: fmt.Sprintf("open-file limit %d (hard) could not be raised to the %d that pgmfa's default --max-conns needs for -sessions %d (no CAP_SYS_RESOURCE); pgmfa gets --max-conns %d (two descriptors per held session fit)",
			rl.Max, need, sessions, mc),
		MaxConns: mc,
	}, nil
}

// memAvailableKB is the machine's MemAvailable from /proc/meminfo, in KiB
// (-1 when unknown).
func memAvailableKB() int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return -1
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), "MemAvailable:"); ok {
			fs := strings.Fields(rest)
			if len(fs) > 0 {
				if n, err := strconv.ParseInt(fs[0], 10, 64); err == nil {
					return n
				}
			}
		}
	}
	return -1
}

// minMemAvailableKB is the machine memory the session workloads leave free:
// every held session is also a PostgreSQL backend (~1.7 MiB each measured
// here), so 10,000 of them take ~17 GiB. Below this, no further session is
// opened and the workload fails with a clear reason instead of driving the
// machine (shared with other jobs) into the OOM killer.
const minMemAvailableKB = 2 << 20

// errLowMemory is the error of a session workload stopped by
// minMemAvailableKB.
func errLowMemory(opened, n int) error {
	return fmt.Errorf("stopped after %d of %d sessions: the machine has less than %d MiB available (each session is also a PostgreSQL backend); lower -sessions", opened, n, minMemAvailableKB>>10)
}
