package main

import (
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// Machine describes where the figures were taken; they mean little without it.
type Machine struct {
	Cores      int      `json:"cores"`
	CPUModel   string   `json:"cpu_model"`
	Kernel     string   `json:"kernel"`
	MemTotal   string   `json:"mem_total"`
	PostgreSQL string   `json:"postgresql"`
	Pgbouncer  string   `json:"pgbouncer"`
	Go         string   `json:"go"`
	Pgmfa      string   `json:"pgmfa"`
	PgmfaFlags []string `json:"pgmfa_flags"`
}

func describeMachine(e *env) Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version(), PgmfaFlags: e.cfg.PgmfaFlags}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	m.CPUModel = procField("/proc/cpuinfo", "model name")
	m.MemTotal = procField("/proc/meminfo", "MemTotal")
	if e.cluster != nil {
		m.PostgreSQL, _ = e.cluster.Psql("SELECT version()")
	}
	if b, err := exec.Command("pgbouncer", "--version").Output(); err == nil {
		m.Pgbouncer = firstLine(strings.TrimSpace(string(b)))
	} else if b, err := exec.Command("/usr/sbin/pgbouncer", "--version").Output(); err == nil {
		m.Pgbouncer = firstLine(strings.TrimSpace(string(b)))
	}
	if e.pgmfaBin != "" {
		m.Pgmfa = pgmfaVersion(e.pgmfaBin) + " (" + e.pgmfaBin + ")"
	}
	return m
}

// procField returns the value of the first "key: value" line of a /proc file.
func procField(path, key string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return ""
}
