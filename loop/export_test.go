package loop

// SplicerState reports, for tests, how many spliced sessions the splicer
// still follows and how many entries are left in its BPF maps (0, 0, nil
// when the server has no splicer).
func (s *Server) SplicerState() (sessions, entries int, err error) {
	if s.splicer == nil {
		return 0, 0, nil
	}
	entries, err = s.splicer.MapEntries()
	return s.splicer.Sessions(), entries, err
}
