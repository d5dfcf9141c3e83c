package tlsproxy

import (
	"time"
)

// audit writes the one structured line per login, in the shape of package
// loop's (so one log query covers both paths), plus whether each side was
// encrypted. Codes and passwords never appear: the machine never exposes
// them, and errors carry no secrets.
func (s *sess) audit(ok bool, err error) {
	if s.logged || s.m.User() == "" {
		return
	}
	s.logged = true
	attrs := []any{
		"conn", s.h.ID, "client", s.h.Addr, "user", s.m.User(), "database", s.m.Database(),
		"method", orDash(s.m.Method()), "mfa", orDash(string(s.mfaPath)),
		"duration", time.Since(s.start).Round(time.Microsecond),
		"tls", s.m.Encrypted(), "upstream_tls", isTLS(s.up),
	}
	if f := s.d.cfg.Hooks.LoginDone; f != nil {
		f(ok)
	}
	if ok {
		s.d.log.Info("login", append(attrs, "result", "ok")...)
		return
	}
	if s.mfaReason != "" {
		attrs = append(attrs, "mfa_result", s.mfaReason)
	}
	if err != nil {
		attrs = append(attrs, "error", err.Error())
	}
	s.d.log.Warn("login", append(attrs, "result", "refused", "phase", s.m.Phase().String())...)
}

// logEnd writes the "session end" line of a relayed session.
func (s *sess) logEnd() {
	s.d.log.Info("session end", "conn", s.h.ID, "client", s.h.Addr, "user", s.m.User(), "database", s.m.Database(),
		"mode", "tls-relay", "bytes_client_to_server", s.c2s.Load(), "bytes_server_to_client", s.s2c.Load(),
		"duration", time.Since(s.relayStart).Round(time.Millisecond), "reason", s.reason)
}

func orDash(v string) string {
	if v == "" {
		return "-"
	}
	return v
}
