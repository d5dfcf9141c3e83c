package bpf

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/pgmfa/pgmfa/bench/pgcluster/pgtest"
)

// TestProbe: as root (as in CI) kernel splicing must be available here.
func TestProbe(t *testing.T) {
	err := Probe()
	if err != nil && os.Geteuid() != 0 {
		pgtest.SkipOrFail(t, "not root: %v", err)
	}
	if err != nil {
		t.Fatalf("Probe as root: %v", err)
	}
}

const probeChildEnv = "PGMFA_BPF_PROBE_CHILD"

// TestProbeChild is the body of TestProbeUnprivileged's child process; it
// does nothing in a normal run.
func TestProbeChild(t *testing.T) {
	if os.Getenv(probeChildEnv) != "1" {
		t.Skip("only runs as TestProbeUnprivileged's child")
	}
	if err := Probe(); err != nil {
		os.Stdout.WriteString("PROBE-ERROR:" + err.Error() + "\n")
	} else {
		os.Stdout.WriteString("PROBE-OK\n")
	}
}

// TestProbeUnprivileged re-executes the test binary as nobody and checks
// that Probe refuses with one sentence naming the cause.
func TestProbeUnprivileged(t *testing.T) {
	if os.Geteuid() != 0 {
		pgtest.SkipOrFail(t, "needs root to run the probe as nobody")
	}
	// The go test binary sits in a 0700 build directory; nobody needs a
	// copy it can execute.
	dir, err := os.MkdirTemp("", "pgmfa-probe")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "bpf.test")
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.Copy(dst, src)
	src.Close()
	dst.Close()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestProbeChild$", "-test.count=1")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), probeChildEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	var msg string
	for _, line := range strings.Split(string(out), "\n") {
		if rest, ok := strings.CutPrefix(line, "PROBE-ERROR:"); ok {
			msg = rest
		}
		if line == "PROBE-OK" {
			t.Fatal("Probe succeeded as nobody")
		}
	}
	if msg == "" {
		t.Fatalf("no probe result from the child:\n%s", out)
	}
	t.Logf("Probe as nobody: %s", msg)
	if strings.Contains(strings.TrimSuffix(msg, "."), ". ") || !strings.Contains(msg, "root") {
		t.Errorf("want one sentence that names the missing privilege, got %q", msg)
	}
}
