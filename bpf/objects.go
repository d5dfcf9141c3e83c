package bpf

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// loaded is the kernel side of a Splicer: the maps of splice.c and the
// verdict program, attached to verdict_socks, and, where the kernel allows
// it, the queue iterator.
type loaded struct {
	spliceObjects
	attached bool
	queues   *link.Iter // pgmfa_queues over targets; nil when noQueues != nil
	noQueues error      // why the iterator is unavailable (unix upstreams are then not spliced)
}

// load loads splice.c and attaches the verdict program. On error nothing
// is left behind, and the error is one sentence saying why.
//
// The iterator is loaded on its own, after the rest: it is a BTF tracing
// program, which some kernels refuse to a process that may load sk_skb
// programs (measured here: every BPF_PROG_TYPE_TRACING load, fentry or
// iterator, fails with EPERM before verification while kprobe,
// socket-filter and sk_skb programs load; this sandbox's root lacks
// CAP_SYS_RESOURCE and its kernel is locked down with the BPF LSM active,
// and which of them refuses it is not established, see doc.go). Only unix-socket
// upstreams need it, so its absence turns their splicing off (they are
// relayed) rather than all splicing.
func load() (*loaded, error) {
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones
	// use memcg and this is a no-op.
	if err := rlimit.RemoveMemlock(); err != nil && !errors.Is(err, unix.EPERM) {
		return nil, fmt.Errorf("cannot raise the locked-memory limit for BPF maps: %v", err)
	}
	spec, err := loadSplice()
	if err != nil {
		return nil, explainLoadError(err)
	}
	l := &loaded{}
	if err := spec.LoadAndAssign(&l.spliceMaps, nil); err != nil {
		return nil, explainLoadError(err)
	}
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		"dirs": l.Dirs, "relayed": l.Relayed, "targets": l.Targets,
		"verdict_socks": l.VerdictSocks, "events": l.Events, "lost": l.Lost,
	}}
	var verdict struct {
		P *ebpf.Program `ebpf:"pgmfa_verdict"`
	}
	if err := spec.LoadAndAssign(&verdict, opts); err != nil {
		l.spliceObjects.Close()
		return nil, explainLoadError(err)
	}
	l.PgmfaVerdict = verdict.P
	err = link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  l.VerdictSocks.FD(),
		Program: l.PgmfaVerdict,
		Attach:  ebpf.AttachSkSKBStreamVerdict,
	})
	if err != nil {
		l.spliceObjects.Close()
		return nil, fmt.Errorf("the kernel refused to attach the sk_skb stream verdict program to a SOCKHASH: %v", err)
	}
	l.attached = true
	var queues struct {
		P *ebpf.Program `ebpf:"pgmfa_queues"`
	}
	if err := spec.LoadAndAssign(&queues, opts); err != nil {
		l.noQueues = fmt.Errorf("the kernel refused the sockmap iterator program (a BTF tracing program): %v", oneLine(err.Error()))
		return l, nil
	}
	l.PgmfaQueues = queues.P
	if l.queues, err = link.AttachIter(link.IterOptions{Program: l.PgmfaQueues, Map: l.Targets}); err != nil {
		l.noQueues = fmt.Errorf("the kernel refused to attach the sockmap iterator (needs BTF and Linux 5.10 or later): %v", err)
	}
	return l, nil
}

// queueLen runs pgmfa_queues and returns the length of the redirect queue
// of the socket with the given cookie (-1: the socket is not in targets
// or has no psock).
func (l *loaded) queueLen(cookie uint64) (int64, error) {
	if l.queues == nil {
		return 0, l.noQueues
	}
	r, err := l.queues.Open()
	if err != nil {
		return 0, fmt.Errorf("running the queue iterator: %w", err)
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		return 0, fmt.Errorf("reading the queue iterator: %w", err)
	}
	for ; len(b) >= 16; b = b[16:] {
		if binary.NativeEndian.Uint64(b) == cookie {
			return int64(binary.NativeEndian.Uint64(b[8:])), nil
		}
	}
	return -1, nil
}

// close detaches the program and closes every map. Sockets still in the
// maps are released by the kernel when the last reference to a map goes.
func (l *loaded) close() error {
	var errs []error
	if l.queues != nil {
		errs = append(errs, l.queues.Close())
		l.queues = nil
	}
	if l.attached {
		errs = append(errs, link.RawDetachProgram(link.RawDetachProgramOptions{
			Target:  l.VerdictSocks.FD(),
			Program: l.PgmfaVerdict,
			Attach:  ebpf.AttachSkSKBStreamVerdict,
		}))
		l.attached = false
	}
	errs = append(errs, l.spliceObjects.Close())
	return errors.Join(errs...)
}

// minKernel is the oldest Linux that can load the verdict program: it calls
// the kfunc bpf_cast_to_kern_ctx (commit fd264ca02094, first released in
// 6.2) and the helper bpf_skc_to_unix_sock (commit 9eeb3aa33ae0, 5.16); the
// rest (SOCKHASH, ring buffers, sk_skb stream verdicts, the sockmap
// iterator) is older. Only 6.18 is tested here.
const minKernel = "Linux 6.2"

// explainLoadError turns a load failure into one sentence naming the cause
// an operator can act on.
func explainLoadError(err error) error {
	var verr *ebpf.VerifierError
	switch {
	case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
		if os.Geteuid() != 0 {
			return fmt.Errorf("kernel splicing needs root or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, and this process (uid %d) has neither", os.Geteuid())
		}
		return fmt.Errorf("the kernel refused BPF to root (lockdown, a seccomp filter or a missing capability): %v", err)
	case errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EINVAL) && strings.Contains(err.Error(), "map create"):
		return fmt.Errorf("this kernel lacks SOCKHASH or ring-buffer maps or sk_skb programs (needs %s or later with CONFIG_BPF_STREAM_PARSER): %v", minKernel, err)
	case errors.Is(err, unix.ENOMEM):
		return fmt.Errorf("the locked-memory limit is too low for the BPF maps (raise RLIMIT_MEMLOCK): %v", err)
	case errors.As(err, &verr):
		return fmt.Errorf("the kernel refused the sk_skb verdict program (it needs %s or later, with BTF): %v", minKernel, oneLine(verr.Error()))
	}
	return fmt.Errorf("the kernel refused the splice BPF objects: %v", oneLine(err.Error()))
}

func oneLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return strings.TrimRight(s, ". :")
}

// handedMaps and handedPrograms name, in splice.c's terms and in the order
// a hand-over sends their fds, the kernel objects a new process takes
// over (HandOver, Adopt); pgmfa_queues follows when it is loaded.
var (
	handedMaps     = []string{spliceMapTargets, spliceMapVerdictSocks, spliceMapDirs, spliceMapRelayed, spliceMapEvents, spliceMapLost}
	handedPrograms = []string{spliceProgPgmfaVerdict, spliceProgPgmfaQueues}
)

// handed returns the names and fds of the objects to hand over.
func (l *loaded) handed() (names []string, fds []int) {
	for _, o := range []struct {
		name string
		fd   int
	}{
		{spliceMapTargets, l.Targets.FD()}, {spliceMapVerdictSocks, l.VerdictSocks.FD()},
		{spliceMapDirs, l.Dirs.FD()}, {spliceMapRelayed, l.Relayed.FD()},
		{spliceMapEvents, l.Events.FD()}, {spliceMapLost, l.Lost.FD()},
		{spliceProgPgmfaVerdict, l.PgmfaVerdict.FD()},
	} {
		names, fds = append(names, o.name), append(fds, o.fd)
	}
	if l.PgmfaQueues != nil {
		names, fds = append(names, spliceProgPgmfaQueues), append(fds, l.PgmfaQueues.FD())
	}
	return names, fds
}

// objectHash identifies the BPF object this binary embeds: a hand-over is
// only possible between binaries with the same one, since the new process
// keeps running the old program on the old maps (a psock keeps the
// program it was linked with) and reads their values with its own
// layouts.
func objectHash() string {
	sum := sha256.Sum256(_SpliceBytes)
	return hex.EncodeToString(sum[:16])
}

// adopt wraps objects another process handed over (names and fds in the
// order of handed; it owns the fds from here on, and on error they are
// closed). Each map is checked against this binary's spec. The verdict
// program stays attached to verdict_socks as the first process attached
// it: attaching again would give new sockets another program than the
// ones already spliced (and the new process detaches it on Close, like
// one that loaded it). The iterator gets a link of its own, since links
// die with the process that made them; noQueues is the old process's
// reason when it had no iterator.
func adopt(names []string, fds []int, noQueues string) (l *loaded, err error) {
	l = &loaded{}
	next := 0
	defer func() {
		if err != nil {
			for _, fd := range fds[next:] {
				unix.Close(fd)
			}
			l.spliceObjects.Close()
			if l.queues != nil {
				l.queues.Close()
			}
		}
	}()
	spec, err := loadSplice()
	if err != nil {
		return nil, err
	}
	want := append(append([]string(nil), handedMaps...), handedPrograms[0])
	if len(names) == len(want)+1 {
		want = append(want, handedPrograms[1])
	}
	if strings.Join(names, ",") != strings.Join(want, ",") || len(fds) != len(names) {
		return l, fmt.Errorf("the hand-over carries the objects %v with %d fds, want %v", names, len(fds), want)
	}
	maps := map[string]**ebpf.Map{
		spliceMapTargets: &l.Targets, spliceMapVerdictSocks: &l.VerdictSocks, spliceMapDirs: &l.Dirs,
		spliceMapRelayed: &l.Relayed, spliceMapEvents: &l.Events, spliceMapLost: &l.Lost,
	}
	progs := map[string]**ebpf.Program{spliceProgPgmfaVerdict: &l.PgmfaVerdict, spliceProgPgmfaQueues: &l.PgmfaQueues}
	for i, name := range names {
		next = i + 1 // the wrapper owns fds[i] from here, even on error
		if dst, ok := maps[name]; ok {
			m, err := ebpf.NewMapFromFD(fds[i])
			if err != nil {
				return l, fmt.Errorf("the hand-over's %s is not a BPF map: %w", name, err)
			}
			*dst = m
			if err := spec.Maps[name].Compatible(m); err != nil {
				return l, fmt.Errorf("the hand-over's map %s does not match this binary's: %w", name, err)
			}
			continue
		}
		p, err := ebpf.NewProgramFromFD(fds[i])
		if err != nil {
			return l, fmt.Errorf("the hand-over's %s is not a BPF program: %w", name, err)
		}
		*progs[name] = p
		if p.Type() != spec.Programs[name].Type {
			return l, fmt.Errorf("the hand-over's program %s is of type %v, want %v", name, p.Type(), spec.Programs[name].Type)
		}
	}
	l.attached = true
	if l.PgmfaQueues == nil {
		l.noQueues = errors.New(noQueues)
		if noQueues == "" {
			l.noQueues = errors.New("the old process had no sockmap iterator")
		}
		return l, nil
	}
	if l.queues, err = link.AttachIter(link.IterOptions{Program: l.PgmfaQueues, Map: l.Targets}); err != nil {
		l.noQueues = fmt.Errorf("the kernel refused to attach the sockmap iterator: %v", err)
		err = nil
	}
	return l, nil
}
