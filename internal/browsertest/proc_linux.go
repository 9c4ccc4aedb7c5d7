package browsertest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// browser is a running headless Chromium and every process it started.
type browser struct {
	cmd    *exec.Cmd
	dir    string // the run's temporary directory, named in every process's arguments
	stderr *tailBuffer
	done   chan struct{} // closed when Chromium has exited
	err    error         // cmd.Wait's error, set before done is closed
	once   sync.Once
}

// chromiumFlags are the flags of every run: headless, no sandbox (we may
// be root in a container), and nothing that talks to the network on its own.
var chromiumFlags = []string{
	"--headless",
	"--no-sandbox",
	"--disable-gpu",
	"--disable-quic",
	"--no-first-run",
	"--no-default-browser-check",
	"--disable-background-networking",
	"--disable-component-update",
	"--disable-sync",
	"--disable-extensions",
	"--disable-default-apps",
	"--metrics-recording-only",
	// Page console messages (the page logs its result) go to stderr.
	"--enable-logging=stderr",
	"--v=0",
}

// startBrowser starts Chromium at pageURL with its profile in dir/profile,
// HOME (and so the NSS database in home/.pki/nssdb) at home, and name
// resolution limited by hostRules.
func startBrowser(chromium, dir, home, hostRules, pageURL string) (*browser, error) {
	args := append([]string{}, chromiumFlags...)
	args = append(args,
		"--user-data-dir="+filepath.Join(dir, "profile"),
		"--host-resolver-rules="+resolverRules(hostRules),
		pageURL,
	)
	cmd := exec.Command(chromium, args...)
	cmd.Dir = dir
	// Everything Chromium writes outside its profile (NSS database, crash
	// reports, caches, temporary files) lands under dir, which Dial removes:
	// a killed Chromium does not clean up after itself.
	tmp := filepath.Join(dir, "tmp")
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return nil, err
	}
	cmd.Env = append(os.Environ(),
		"TMPDIR="+tmp,
		"HOME="+home,
		"XDG_CONFIG_HOME="+filepath.Join(home, ".config"),
		"XDG_CACHE_HOME="+filepath.Join(home, ".cache"),
		"XDG_DATA_HOME="+filepath.Join(home, ".local", "share"),
	)
	b := &browser{cmd: cmd, dir: dir, stderr: &tailBuffer{max: 64 << 10}, done: make(chan struct{})}
	cmd.Stdout = b.stderr
	cmd.Stderr = b.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group, so that one kill reaches the zygotes,
		// renderers and the GPU, network and storage services.
		Setpgid: true,
		// If the test binary dies (say, at go test's -timeout), take
		// Chromium with it rather than leave it running.
		Pdeathsig: syscall.SIGKILL,
	}
	// Wait returns once stderr is copied; a process outside the group
	// holding the pipe must not make it hang.
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting chromium: %w", err)
	}
	go func() {
		b.err = cmd.Wait()
		close(b.done)
	}()
	return b, nil
}

// kill kills Chromium's process group and its crash handlers, and waits
// for them all to be gone. It may be called more than once.
func (b *browser) kill() {
	b.once.Do(func() {
		_ = syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL) // negative: the group
		<-b.done
		// chrome_crashpad_handler detaches into a session of its own, out
		// of reach of the group kill. It exits by itself once Chromium is
		// gone, but may still be writing under dir: end it now. It is found
		// by dir, which only this run's processes name.
		deadline := time.Now().Add(2 * time.Second)
		for {
			pids := processesNaming(b.dir)
			if len(pids) == 0 || time.Now().After(deadline) {
				return
			}
			for _, pid := range pids {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// processesNaming returns the live (not zombie) processes with an argument
// containing s.
func processesNaming(s string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte(s)) {
			continue
		}
		// A zombie is dead already; its parent (init) reaps it.
		if stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			if i := bytes.LastIndexByte(stat, ')'); i >= 0 && bytes.HasPrefix(stat[i+1:], []byte(" Z")) {
				continue
			}
		}
		pids = append(pids, pid)
	}
	return pids
}
