package bpf

import (
	"encoding/binary"
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
