package bpf

import (
	"fmt"
	"strings"
)

// dump describes every live session, for diagnosing a hung test. It reads
// watcher-owned state without synchronisation: diagnostics only.
func (s *Splicer) dump() string {
	var b strings.Builder
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ss := range s.sessions {
		fmt.Fprintf(&b, "session %d fds %v epoll %x recheck %v\n", ss.id, ss.fds, ss.mask, ss.recheckAt)
		for _, d := range ss.dirs {
			v, _ := s.dirState(ss, d)
			p, perr := writeProgress(ss.fds[d.dst])
			fmt.Fprintf(&b, "  %v->%v fin %v shut %v waitOut %v relaying %v out %d redirected %d passed %d read %d written %d episodes %d flags %d dst progress %d (%v)\n",
				d.src, d.dst, d.fin, d.shut, d.waitOut, d.buf != nil, len(d.out), v.Redirected, v.Passed, d.uread, d.uwrite, v.Episodes, v.Flags, p-d.base, perr)
		}
	}
	return b.String()
}
