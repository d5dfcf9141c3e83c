package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// procs tracks every long-running process the suite starts (pgmfa,
// pgbouncer) so that they are all stopped by PID on the way out, whether the
// run ends normally, on an error or on Ctrl-C.
type procs struct {
	mu   sync.Mutex
	cmds []*exec.Cmd
	done map[*exec.Cmd]chan struct{}
}

// start starts cmd and remembers it. A goroutine reaps it so that an early
// exit is noticed (exited) and no zombie is left.
func (p *procs) start(cmd *exec.Cmd) error {
	if err := cmd.Start(); err != nil {
		return err
	}
	ch := make(chan struct{})
	go func() { _ = cmd.Wait(); close(ch) }()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done == nil {
		p.done = map[*exec.Cmd]chan struct{}{}
	}
	p.cmds = append(p.cmds, cmd)
	p.done[cmd] = ch
	return nil
}

// exited reports whether cmd has already terminated.
func (p *procs) exited(cmd *exec.Cmd) bool {
	p.mu.Lock()
	ch := p.done[cmd]
	p.mu.Unlock()
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to cmd's PID, and SIGKILL when it has not exited
// within a few seconds.
func (p *procs) stop(cmd *exec.Cmd) {
	p.mu.Lock()
	ch := p.done[cmd]
	p.mu.Unlock()
	if ch == nil || cmd.Process == nil {
		return
	}
	select {
	case <-ch:
		return
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		fmt.Fprintf(os.Stderr, "bench: %s (pid %d) ignored SIGTERM; killing it\n", cmd.Path, cmd.Process.Pid)
		_ = cmd.Process.Kill()
		<-ch
	}
}

// stopAll stops every process started, newest first.
func (p *procs) stopAll() {
	p.mu.Lock()
	cmds := append([]*exec.Cmd(nil), p.cmds...)
	p.mu.Unlock()
	for i := len(cmds) - 1; i >= 0; i-- {
		p.stop(cmds[i])
	}
}

// waitListening waits until addr accepts TCP connections, the process
// exits, or the timeout passes.
func (p *procs) waitListening(cmd *exec.Cmd, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		if p.exited(cmd) {
			return fmt.Errorf("exited before listening on %s (%v)", addr, cmd.ProcessState)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not listening on %s after %v", addr, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
