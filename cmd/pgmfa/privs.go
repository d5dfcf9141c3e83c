package main

// Least privilege for `pgmfa serve`.
//
// What needs a capability, measured on Linux 6.18 (kernel.unprivileged_bpf_disabled=2)
// by loading splice.c step by step as an ordinary user given one capability
// set after another (setpriv), and by splicing TCP sessions after dropping
// them (the facts are also in bpf/doc.go, "Capabilities"):
//
//   - CAP_BPF: every map create fails with EPERM without it.
//   - CAP_NET_ADMIN: with CAP_BPF alone the hash, array and ring-buffer maps
//     are created but the two SOCKHASHes fail with EPERM (the kernel also
//     counts sk_skb among the net-admin program types).
//   - CAP_PERFMON: with CAP_BPF and CAP_NET_ADMIN the verifier refuses the
//     verdict program (EACCES, "pointer arithmetic with it prohibited for
//     !root" on the sk_buff from bpf_cast_to_kern_ctx); with all three it
//     loads and attaches. CAP_SYS_ADMIN alone also does (the kernel accepts
//     it in place of each of the three).
//   - RLIMIT_MEMLOCK needs nothing: BPF memory is charged to the memory
//     cgroup (cilium/ebpf's RemoveMemlock detects it), so CAP_SYS_RESOURCE
//     is not needed.
//   - CAP_NET_BIND_SERVICE: only for a listener on a port below
//     net.ipv4.ip_unprivileged_port_start (1024 by default).
//   - After start-up nothing: with every capability dropped, sessions are
//     still inserted into the sockmaps and hash maps (map updates on a map
//     fd the process holds are not capability-checked), the ring buffer is
//     read, spliced sessions end cleanly and the program is detached at
//     shutdown. So pgmfa keeps no capability once it serves.
//
// Capabilities belong to each thread, and a Go program has several threads
// before main runs, so every change here goes through
// syscall.AllThreadsSyscall (Go's own set*id calls do the same since Go
// 1.16); the result is checked in /proc/self/task/*/status. The runtime
// refuses AllThreadsSyscall in a binary that links cgo, which is why the
// Makefile builds pgmfa with CGO_ENABLED=0.

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pgmfa/pgmfa/loop"
	"github.com/pgmfa/pgmfa/loop/admin"
	"github.com/pgmfa/pgmfa/loop/sysmon"
)

// privFlags are serve's flags for least privilege.
type privFlags struct {
	user    string
	account *account // user, resolved
	// guard (nil: --quiet-sysmon off or not possible) sets back what
	// threads inherited from sysmon (loop/sysmon): once more just before
	// the drop, while the process may still set their timer slack, and
	// once serving.
	guard *sysmon.Guard
}

func (p *privFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&p.user, "user", "", "when started as root: the user (name or uid) to switch to once the BPF program is loaded and the listeners are bound; supplementary groups become that user's. Not needed under systemd's User= (see README, \"Running as a service\"). Either way every capability is dropped after start-up and no_new_privs is set")
}

// afterStart tells systemd the proxy is ready once it serves (its
// privileges are gone by then: beforeAccept).
func (f *serveFlags) afterStart(p *proxy, logger *slog.Logger) {
	<-p.srv.Ready()
	if p.srv.Err() != nil {
		return
	}
	if f.privs.guard != nil {
		// Start-up is when the runtime starts most of its threads, some
		// from sysmon (loop/sysmon): set them back before the first login.
		f.privs.guard.Check()
	}
	if err := sdNotify("READY=1"); err != nil {
		logger.Warn("could not tell systemd the service is ready", "err", err)
	}
}

// beforeAccept is the server's BeforeAccept: privileges go once the
// program is loaded and the listeners are bound, before any client is
// accepted. If the drop fails the proxy stops (serve exits 1) rather than
// serve with privileges it was told to shed: with --user, or when the
// failure is not the cgo limit. A cgo build without --user keeps its
// capabilities and says so.
func (f *serveFlags) beforeAccept(logger *slog.Logger) error {
	if f.privs.guard != nil {
		// Start-up has started most of the threads the process will
		// have, some from sysmon; after the drop their timer slack can no
		// longer be set back.
		f.privs.guard.Check()
	}
	err := f.dropPrivileges(logger)
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.ENOTSUP) && f.privs.user == "" {
		if self, _ := readProcCaps("/proc/self/status"); self.prm|self.amb != 0 {
			logger.Warn("capabilities NOT dropped", "kept", self.prm.String(), "err", err)
		} else {
			logger.Warn("no_new_privs not set (this process holds no capability)", "err", err)
		}
		return nil
	}
	return fmt.Errorf("cannot drop privileges: %w", err)
}

// capSet is a set of Linux capabilities, bit n for capability n.
type capSet uint64

const (
	capSetpcap        = 8
	capNetBindService = 10
	capNetAdmin       = 12
	capSysAdmin       = 21
	capPerfmon        = 38
	capBPF            = 39
)

// capNames are the kernel's names for capabilities 0 to 40 (Linux 5.9+).
var capNames = []string{
	"cap_chown", "cap_dac_override", "cap_dac_read_search", "cap_fowner", "cap_fsetid",
	"cap_kill", "cap_setgid", "cap_setuid", "cap_setpcap", "cap_linux_immutable",
	"cap_net_bind_service", "cap_net_broadcast", "cap_net_admin", "cap_net_raw", "cap_ipc_lock",
	"cap_ipc_owner", "cap_sys_module", "cap_sys_rawio", "cap_sys_chroot", "cap_sys_ptrace",
	"cap_sys_pacct", "cap_sys_admin", "cap_sys_boot", "cap_sys_nice", "cap_sys_resource",
	"cap_sys_time", "cap_sys_tty_config", "cap_mknod", "cap_lease", "cap_audit_write",
	"cap_audit_control", "cap_setfcap", "cap_mac_override", "cap_mac_admin", "cap_syslog",
	"cap_wake_alarm", "cap_block_suspend", "cap_audit_read", "cap_perfmon", "cap_bpf",
	"cap_checkpoint_restore",
}

func (c capSet) has(n int) bool { return c&(1<<n) != 0 }

// String lists the set by name ("none" when empty).
func (c capSet) String() string {
	var names []string
	for n := 0; n < 64; n++ {
		if !c.has(n) {
			continue
		}
		if n < len(capNames) {
			names = append(names, capNames[n])
		} else {
			names = append(names, "cap_"+strconv.Itoa(n))
		}
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ",")
}

// spliceCaps are what loading the sockmap program needs.
var spliceCaps = []int{capBPF, capNetAdmin, capPerfmon}

// procCaps is one thread's capability sets and no_new_privs flag, as
// /proc/…/status shows them.
type procCaps struct {
	inh, prm, eff, bnd, amb capSet
	noNewPrivs              bool
}

func readProcCaps(path string) (procCaps, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return procCaps{}, err
	}
	var pc procCaps
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		var dst *capSet
		switch k {
		case "CapInh":
			dst = &pc.inh
		case "CapPrm":
			dst = &pc.prm
		case "CapEff":
			dst = &pc.eff
		case "CapBnd":
			dst = &pc.bnd
		case "CapAmb":
			dst = &pc.amb
		case "NoNewPrivs":
			pc.noNewPrivs = v == "1"
			continue
		default:
			continue
		}
		n, err := strconv.ParseUint(v, 16, 64)
		if err != nil {
			return procCaps{}, fmt.Errorf("%s: %s: %v", path, k, err)
		}
		*dst = capSet(n)
	}
	return pc, nil
}

// missingSpliceCaps returns the capabilities of spliceCaps that eff lacks;
// CAP_SYS_ADMIN stands in for all of them.
func missingSpliceCaps(eff capSet) capSet {
	if eff.has(capSysAdmin) {
		return 0
	}
	var m capSet
	for _, c := range spliceCaps {
		if !eff.has(c) {
			m |= 1 << c
		}
	}
	return m
}

// checkStartCaps compares the process's effective capabilities with what
// start-up will need, before anything is loaded or bound, so that a missing
// one is named rather than surfacing as a verifier message or EACCES. A
// --splice auto that cannot load the program falls back to the relay (it
// is switched to off here, with the reason logged); --splice sockmap and a
// privileged port are errors.
func (f *serveFlags) checkStartCaps(logger *slog.Logger) error {
	self, err := readProcCaps("/proc/self/status")
	if err != nil {
		return fmt.Errorf("cannot read this process's capabilities: %w", err)
	}
	if f.privs.user != "" {
		// Start-up runs before the switch, with what root has.
		if os.Geteuid() != 0 {
			return fmt.Errorf("--user %s: only a process started as root can switch user (under systemd use User= instead)", f.privs.user)
		}
		// A harmless call on every thread: refused at once in a cgo build,
		// rather than after start-up.
		if err := allThreads(unix.SYS_PRCTL, unix.PR_GET_NO_NEW_PRIVS, 0, 0); err != nil {
			return fmt.Errorf("--user %s: %w", f.privs.user, err)
		}
		if f.privs.account, err = lookupAccount(f.privs.user); err != nil {
			return fmt.Errorf("--user %s: %w", f.privs.user, err)
		}
	}
	if miss := missingSpliceCaps(self.eff); miss != 0 {
		switch f.splice {
		case loop.SpliceSockmap:
			return fmt.Errorf("--splice sockmap: loading the BPF program needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, and this process lacks %s", strings.ToUpper(miss.String()))
		case loop.SpliceAuto, "":
			// The loop's own words for a failed load, with the reason.
			logger.Warn("kernel splicing unavailable; sessions use the user-space relay",
				"reason", "loading the BPF program needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON", "missing", strings.ToUpper(miss.String()))
			f.splice = loop.SpliceOff
		}
	}
	if self.eff.has(capNetBindService) {
		return nil
	}
	start := 1024
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			start = n
		}
	}
	addrs := splitList(f.listen)
	if f.adminAddr != "" && !admin.IsUnix(f.adminAddr) {
		addrs = append(addrs, f.adminAddr)
	}
	for _, a := range addrs {
		if strings.HasPrefix(a, "/") || strings.HasPrefix(a, "@") {
			continue
		}
		if _, p, err := net.SplitHostPort(a); err == nil {
			if port, err := strconv.Atoi(p); err == nil && port > 0 && port < start {
				return fmt.Errorf("listening on %s needs CAP_NET_BIND_SERVICE (ports below %d), which this process lacks", a, start)
			}
		}
	}
	return nil
}

// dropPrivileges runs once the proxy serves (program loaded, listeners
// bound, admin socket created): it switches to --user when given, drops
// every capability on every thread (none is needed any more, see the top
// of this file), the bounding set too when allowed, sets no_new_privs, and
// checks every thread; then it logs what is left.
func (f *serveFlags) dropPrivileges(logger *slog.Logger) error {
	// Bounding set: only with CAP_SETPCAP (root). A process started
	// without it (systemd User=) keeps its bounding set, which
	// CapabilityBoundingSet= already narrowed; with no permitted
	// capabilities and no_new_privs it can never regain any of them.
	self, err := readProcCaps("/proc/self/status")
	if err != nil {
		return err
	}
	if self.eff.has(capSetpcap) {
		for c := 0; c < 64; c++ {
			if !self.bnd.has(c) {
				continue
			}
			if err := allThreads(unix.SYS_PRCTL, unix.PR_CAPBSET_DROP, uintptr(c), 0); err != nil {
				return fmt.Errorf("dropping %s from the bounding set: %w", capSet(1<<c), err)
			}
		}
	}
	if f.privs.account != nil {
		if err := f.privs.account.switchTo(); err != nil {
			return fmt.Errorf("--user %s: %w", f.privs.user, err)
		}
	}
	// Permitted, effective, inheritable (and so ambient) all empty.
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := allThreads(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0); err != nil {
		return fmt.Errorf("dropping capabilities: %w", err)
	}
	if err := allThreads(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0); err != nil {
		return fmt.Errorf("setting no_new_privs: %w", err)
	}
	tasks, err := filepath.Glob("/proc/self/task/*/status")
	if err != nil || len(tasks) == 0 {
		return fmt.Errorf("cannot list this process's threads: %v", err)
	}
	var bnd capSet
	for _, t := range tasks {
		pc, err := readProcCaps(t)
		if errors.Is(err, os.ErrNotExist) {
			continue // a thread that exited meanwhile
		}
		if err != nil {
			return err
		}
		if pc.prm|pc.eff|pc.inh|pc.amb != 0 || !pc.noNewPrivs {
			return fmt.Errorf("thread %s still holds capabilities (permitted %s, effective %s) or lacks no_new_privs", filepath.Base(filepath.Dir(t)), pc.prm, pc.eff)
		}
		bnd = pc.bnd
	}
	logger.Info("privileges dropped", "uid", os.Getuid(), "gid", os.Getgid(), "kept", capSet(0).String(),
		"bounding_set", bnd.String(), "no_new_privs", true, "threads", len(tasks))
	if os.Getuid() == 0 {
		logger.Warn("running as root (without capabilities); use --user or systemd's User= so that a compromise does not own root's files")
	}
	return nil
}

// account is the user --user names, resolved before start-up so that a
// wrong name is a start-up error.
type account struct {
	uid, gid int
	groups   []int // the primary group first
}

func lookupAccount(name string) (*account, error) {
	u, err := user.Lookup(name)
	if err != nil {
		if u, err = user.LookupId(name); err != nil {
			return nil, fmt.Errorf("no such user")
		}
	}
	a := &account{}
	if a.uid, err = strconv.Atoi(u.Uid); err != nil {
		return nil, err
	}
	if a.gid, err = strconv.Atoi(u.Gid); err != nil {
		return nil, err
	}
	if a.uid == 0 {
		return nil, fmt.Errorf("is root; name an unprivileged user")
	}
	a.groups = []int{a.gid}
	if ids, err := u.GroupIds(); err == nil {
		for _, s := range ids {
			if g, err := strconv.Atoi(s); err == nil && g != a.gid {
				a.groups = append(a.groups, g)
			}
		}
	}
	return a, nil
}

// switchTo changes to a's uid, primary gid and supplementary groups. Go
// applies each of these calls to every thread. Leaving uid 0 clears the
// permitted and effective sets by itself; dropPrivileges clears the rest.
func (a *account) switchTo() error {
	if err := syscall.Setgroups(a.groups); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(a.gid, a.gid, a.gid); err != nil {
		return fmt.Errorf("setresgid: %w", err)
	}
	if err := syscall.Setresuid(a.uid, a.uid, a.uid); err != nil {
		return fmt.Errorf("setresuid: %w", err)
	}
	return nil
}

// allThreads makes a system call on every thread of the process.
func allThreads(trap, a1, a2, a3 uintptr) error {
	if _, _, e := syscall.AllThreadsSyscall(trap, a1, a2, a3); e != 0 {
		if e == syscall.ENOTSUP {
			return fmt.Errorf("%w: this binary links cgo, and Go changes every thread's credentials only without it; build pgmfa with CGO_ENABLED=0 (make build does)", e)
		}
		return e
	}
	return nil
}
