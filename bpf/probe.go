package bpf

// Probe reports whether kernel splicing is usable here. nil means yes;
// otherwise the error's message is one sentence saying why (not root or
// missing capabilities, a map or program type the kernel refuses, a kernel
// too old, the locked-memory limit). It loads and attaches the real
// program and map set and releases them again, so a nil result means
// NewSplicer will succeed as far as the kernel is concerned.
func Probe() error {
	l, err := load()
	if err != nil {
		return err
	}
	return l.close()
}

// UnixUpstreams reports whether sessions whose database side is a unix
// socket can be spliced (nil) or why not; those sessions are relayed.
func (s *Splicer) UnixUpstreams() error { return s.obj.noQueues }

// ProbeUnixUpstreams reports whether sessions whose database side is a
// unix socket can be spliced here (nil) or why not (they are relayed).
func ProbeUnixUpstreams() error {
	l, err := load()
	if err != nil {
		return err
	}
	defer l.close()
	return l.noQueues
}
