package netsim_test

// The test side of a role process: start it, read its lines, wait for one.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/p2ptls/autotls/internal/netsim"
)

// proc is one role process of a simulation, seen from the test.
type proc struct {
	t      *testing.T
	name   string
	stdin  io.WriteCloser
	mu     sync.Mutex
	msgs   []msg
	more   chan struct{} // closed and replaced on every line, and at exit
	exited bool
	stderr lockedBuffer
	// stop closes the process's input and waits for it to exit.
	stop func()
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startRole runs this test binary as role inside ns. The process stops
// when the test ends (its standard input is closed; killed 20 s later).
func startRole(t *testing.T, n *netsim.Net, ns, role string, params any) *proc {
	t.Helper()
	raw, err := json.Marshal(params)
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := n.Command(ns, exe, "-test.run=^$")
	cmd.Env = append(cmd.Env, roleEnv+"="+role, paramsEnv+"="+string(raw))
	p := &proc{t: t, name: role, more: make(chan struct{})}
	cmd.Stderr = &p.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.stdin, err = cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", role, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			var m msg
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				m = msg{Ev: "garbage", Text: sc.Text()}
			}
			p.mu.Lock()
			p.msgs = append(p.msgs, m)
			close(p.more)
			p.more = make(chan struct{})
			p.mu.Unlock()
		}
		_ = cmd.Wait()
		p.mu.Lock()
		p.exited = true
		close(p.more)
		p.more = make(chan struct{})
		p.mu.Unlock()
	}()
	p.stop = sync.OnceFunc(func() {
		_ = p.stdin.Close()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Errorf("%s did not stop within 20 s of its input closing; killing it", role)
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("%s stderr:\n%s", role, p.stderr.String())
		}
	})
	t.Cleanup(p.stop)
	return p
}

// await returns the first line from index from on that matches, failing the
// test if the process reports an error or exits, or timeout passes.
func (p *proc) await(from int, timeout time.Duration, what string, match func(msg) bool) (msg, int) {
	p.t.Helper()
	deadline := time.After(timeout)
	for i := from; ; {
		p.mu.Lock()
		msgs, more, exited := p.msgs, p.more, p.exited
		p.mu.Unlock()
		for ; i < len(msgs); i++ {
			if msgs[i].Ev == "error" {
				p.t.Fatalf("%s failed: %s", p.name, msgs[i].Err)
			}
			if match(msgs[i]) {
				return msgs[i], i
			}
		}
		if exited {
			p.t.Fatalf("%s exited while the test waited for %s\nstderr:\n%s", p.name, what, p.stderr.String())
		}
		select {
		case <-more:
		case <-deadline:
			p.t.Fatalf("%s: no %s within %v; its lines:\n%s", p.name, what, timeout, p.dump())
		}
	}
}

// exit waits for the process to end by itself and returns its lines.
func (p *proc) exit(t *testing.T, timeout time.Duration) []msg {
	t.Helper()
	deadline := time.After(timeout)
	for {
		p.mu.Lock()
		exited, more := p.exited, p.more
		p.mu.Unlock()
		if exited {
			return p.lines()
		}
		select {
		case <-more:
		case <-deadline:
			t.Fatalf("%s did not exit within %v", p.name, timeout)
		}
	}
}

func (p *proc) lines() []msg {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.msgs)
}

func (p *proc) dump() string {
	var b strings.Builder
	for _, m := range p.lines() {
		j, _ := json.Marshal(m)
		b.Write(j)
		b.WriteByte('\n')
	}
	return b.String()
}

func (p *proc) send(line string) {
	p.t.Helper()
	if _, err := io.WriteString(p.stdin, line+"\n"); err != nil {
		p.t.Fatalf("writing to %s: %v", p.name, err)
	}
}

func ev(name string) func(msg) bool { return func(m msg) bool { return m.Ev == name } }

// reach matches the host's EvtReachabilityChanged with reachability r.
func reach(r string) func(msg) bool {
	return func(m msg) bool { return m.Ev == "reach" && m.Text == r }
}

// wantLog checks that the host logged exactly one line at level containing
// text.
func wantLog(t *testing.T, p *proc, level, text string) {
	t.Helper()
	var n int
	for _, m := range p.lines() {
		if m.Ev == "log" && m.Level == level && strings.Contains(m.Text, text) {
			n++
		}
	}
	if n != 1 {
		t.Errorf("the host logged %d %s lines with %q, want 1; its lines:\n%s", n, level, text, p.dump())
	}
}
