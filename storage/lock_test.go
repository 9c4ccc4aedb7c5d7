//go:build unix && !aix

package storage

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/goleak"
)

// logRecords is a slog handler that keeps what it is given.
type logRecords struct {
	mu      sync.Mutex
	records []slog.Record
}

func (h *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecords) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *logRecords) WithGroup(string) slog.Handler            { return h }

func (h *logRecords) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records = append(h.records, r.Clone())
	return nil
}

// warnings returns the records at warning level or above, each as its
// message and its attributes.
func (h *logRecords) warnings() []loggedWarning {
	h.mu.Lock()
	defer h.mu.Unlock()
	var ws []loggedWarning
	for _, r := range h.records {
		if r.Level < slog.LevelWarn {
			continue
		}
		w := loggedWarning{msg: r.Message, attrs: make(map[string]string)}
		r.Attrs(func(a slog.Attr) bool {
			w.attrs[a.Key] = a.Value.String()
			return true
		})
		ws = append(ws, w)
	}
	return ws
}

type loggedWarning struct {
	msg   string
	attrs map[string]string
}

// lockRig is a directory with a store on it that logs into logs.
type lockRig struct {
	dir   string
	store *dirStore
	logs  *logRecords
}

func newLockRig(t *testing.T) *lockRig {
	t.Helper()
	r := &lockRig{dir: t.TempDir(), logs: &logRecords{}}
	r.store = r.open(t)
	return r
}

// open returns another store on the rig's directory.
func (r *lockRig) open(t *testing.T) *dirStore {
	t.Helper()
	s, err := Dir(r.dir, WithLogger(slog.New(r.logs)))
	if err != nil {
		t.Fatalf("Dir: %v", err)
	}
	return s.(*dirStore)
}

// lockPath is where certmagic keeps the lock name in the rig's directory.
func (r *lockRig) lockPath(name string) string {
	return (&certmagic.FileStorage{Path: r.dir}).Filename("locks/" + certmagic.StorageKeys.Safe(name) + ".lock")
}

// write puts content at the lock file of name.
func (r *lockRig) write(t *testing.T, name string, content []byte) string {
	t.Helper()
	path := r.lockPath(name)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// mustTryLock fails the test unless s takes the lock name at once.
func mustTryLock(t *testing.T, s certmagic.TryLocker, name string) {
	t.Helper()
	if ok, err := s.TryLock(t.Context(), name); !ok || err != nil {
		t.Fatalf("TryLock(%q) = %v, %v; want true, nil", name, ok, err)
	}
}

// lockAfter runs s.Lock(name) in a goroutine that has told the caller it
// is starting; the result says whether the caller had set released by the
// time the lock was taken.
func lockAfter(t *testing.T, s certmagic.Locker, name string, released *atomic.Bool) <-chan error {
	t.Helper()
	started := make(chan struct{})
	result := make(chan error, 1)
	go func() {
		close(started)
		err := s.Lock(t.Context(), name)
		if err == nil && !released.Load() {
			err = errors.New("took the lock while another holder had it")
		}
		result <- err
	}()
	<-started
	return result
}

// TestDirLockExcludesOtherStores: two stores on the same directory, as in
// two processes, never hold a lock at once: TryLock fails while the other
// holds it, and Lock returns only after the other's Unlock. The file is
// gone after Unlock.
func TestDirLockExcludesOtherStores(t *testing.T) {
	r := newLockRig(t)
	a, b := r.store, r.open(t)
	ctx := t.Context()
	mustTryLock(t, a, "issue")

	if ok, err := b.TryLock(ctx, "issue"); ok || err != nil {
		t.Fatalf("TryLock on the other store = %v, %v; want false, nil", ok, err)
	}
	var released atomic.Bool
	got := lockAfter(t, b, "issue", &released)
	if ok, err := b.TryLock(ctx, "issue"); ok || err != nil {
		t.Fatalf("TryLock while Lock waits = %v, %v; want false, nil", ok, err)
	}
	released.Store(true)
	if err := a.Unlock(ctx, "issue"); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if err := <-got; err != nil {
		t.Fatalf("waiting Lock: %v", err)
	}
	if ok, err := a.TryLock(ctx, "issue"); ok || err != nil {
		t.Fatalf("TryLock back on the first store = %v, %v; want false, nil", ok, err)
	}
	if err := b.Unlock(ctx, "issue"); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if _, err := os.Stat(r.lockPath("issue")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lock file after Unlock: %v, want it removed", err)
	}
	if ws := r.logs.warnings(); len(ws) != 0 {
		t.Errorf("warnings on the happy path: %v", ws)
	}
}

// lockChildEnv carries the directory of TestDirLockChild's store.
const lockChildEnv = "AUTOTLS_TEST_LOCK_CHILD"

// TestDirLockChild is the process TestDirLockCrashedHolder kills while it
// holds a lock: it is skipped unless run by it.
func TestDirLockChild(t *testing.T) {
	dir := os.Getenv(lockChildEnv)
	if dir == "" {
		t.Skip("the process TestDirLockCrashedHolder kills")
	}
	s, err := Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Lock(t.Context(), "issue"); err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString("locked\n")
	// Killed long before; ends anyway should the parent be gone.
	time.Sleep(time.Minute)
}

// TestDirLockCrashedHolder: a lock whose holder was killed (SIGKILL: no
// Unlock, no deferred code) is free at once: TryLock takes it, with no
// staleness wait and no warning.
func TestDirLockCrashedHolder(t *testing.T) {
	r := newLockRig(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestDirLockChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), lockChildEnv+"="+r.dir)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	lines := bufio.NewScanner(out)
	for lines.Scan() && lines.Text() != "locked" {
	}
	if lines.Text() != "locked" {
		t.Fatalf("the child ended without taking the lock: %v", lines.Err())
	}
	if ok, err := r.store.TryLock(t.Context(), "issue"); ok || err != nil {
		t.Fatalf("TryLock while the child holds the lock = %v, %v; want false, nil", ok, err)
	}

	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait() // "signal: killed"
	start := time.Now()
	mustTryLock(t, r.store, "issue")
	t.Logf("took the dead child's lock in %v", time.Since(start))
	if err := r.store.Unlock(t.Context(), "issue"); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if ws := r.logs.warnings(); len(ws) != 0 {
		t.Errorf("warnings on taking a dead holder's lock: %v", ws)
	}
}

// TestDirLockTakesOver: a lock file no live process holds is taken at once
// whatever it holds; garbage and a date in the future are worth exactly one
// warning naming the file, what a crash or a stale lock leaves is not. The
// file then holds the certmagic-compatible record of the new holder.
func TestDirLockTakesOver(t *testing.T) {
	now := time.Now()
	tests := []struct {
		name     string
		content  []byte
		wantWarn string // empty: no warning
	}{
		{"empty", nil, ""},
		{"certmagic stale", certmagicLock(now.Add(-time.Hour), now.Add(-time.Minute)), ""},
		{"our own, fresh", encodeLock(now), ""},
		{"garbage", []byte(`{"created":"2026-11-23T11:59:`), "held garbage"},
		{"binary garbage", []byte{0, 1, 2, 0xff}, "held garbage"},
		{"dated in the future", certmagicLock(now.Add(time.Hour), now.Add(time.Hour)), "dated in the future"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newLockRig(t)
			path := r.write(t, "issue", tt.content)
			mustTryLock(t, r.store, "issue")

			raw, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			var meta lockMeta
			if err := json.Unmarshal(raw, &meta); err != nil || !meta.Flock || time.Since(meta.Updated) > time.Minute {
				t.Errorf("lock file holds %q (%v), want a fresh record with flock", raw, err)
			}

			ws := r.logs.warnings()
			switch {
			case tt.wantWarn == "" && len(ws) != 0:
				t.Errorf("warnings: %v, want none", ws)
			case tt.wantWarn != "" && len(ws) != 1:
				t.Errorf("warnings: %v, want exactly one", ws)
			case tt.wantWarn != "":
				if !strings.Contains(ws[0].msg, tt.wantWarn) || ws[0].attrs["file"] != path {
					t.Errorf("warning %q %v, want %q naming file=%s", ws[0].msg, ws[0].attrs, tt.wantWarn, path)
				}
			}
			if err := r.store.Unlock(t.Context(), "issue"); err != nil {
				t.Fatalf("Unlock: %v", err)
			}
		})
	}
}

// TestDirLockDirectoryInTheWay: an empty directory where the lock file
// belongs is removed with one warning and the lock taken; a directory with
// something in it is left alone, and Lock fails at once saying which path
// to remove.
func TestDirLockDirectoryInTheWay(t *testing.T) {
	t.Run("empty", func(t *testing.T) {
		r := newLockRig(t)
		path := r.lockPath("issue")
		if err := os.MkdirAll(path, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := r.store.Lock(t.Context(), "issue"); err != nil {
			t.Fatalf("Lock: %v", err)
		}
		if fi, err := os.Stat(path); err != nil || !fi.Mode().IsRegular() {
			t.Errorf("lock path after Lock: %v, %v; want a lock file", fi, err)
		}
		ws := r.logs.warnings()
		if len(ws) != 1 || ws[0].attrs["file"] != path || !strings.Contains(ws[0].msg, "directory") {
			t.Errorf("warnings: %v, want one about the directory naming file=%s", ws, path)
		}
		if err := r.store.Unlock(t.Context(), "issue"); err != nil {
			t.Fatalf("Unlock: %v", err)
		}
	})
	t.Run("not empty", func(t *testing.T) {
		r := newLockRig(t)
		path := r.lockPath("issue")
		inside := filepath.Join(path, "something")
		if err := os.MkdirAll(inside, 0o700); err != nil {
			t.Fatal(err)
		}
		err := r.store.Lock(t.Context(), "issue")
		if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "remove it") {
			t.Fatalf("Lock = %v, want an error naming %s and asking to remove it", err, path)
		}
		if ok, err := r.store.TryLock(t.Context(), "issue"); ok || err == nil {
			t.Errorf("TryLock = %v, %v; want false and the same error", ok, err)
		}
		if _, err := os.Stat(inside); err != nil {
			t.Errorf("the directory's content was touched: %v", err)
		}
		if err := r.store.Lock(t.Context(), "other"); err != nil {
			t.Errorf("Lock of another name: %v", err)
		} else if err := r.store.Unlock(t.Context(), "other"); err != nil {
			t.Errorf("Unlock of another name: %v", err)
		}
	})
}

// TestDirLockCertmagicInterop: during a rolling update, a process still
// on certmagic's own lock and a process on ours exclude each other. Ours
// waits while certmagic's holder keeps its file fresh and takes the lock
// after its Unlock, leaving the file as it was meanwhile; certmagic's
// TryLock fails while ours holds the lock.
func TestDirLockCertmagicInterop(t *testing.T) {
	t.Run("certmagic holds", func(t *testing.T) {
		r := newLockRig(t)
		theirs := &certmagic.FileStorage{Path: r.dir}
		ctx := t.Context()
		if err := theirs.Lock(ctx, "issue"); err != nil {
			t.Fatalf("certmagic Lock: %v", err)
		}
		held, err := os.ReadFile(r.lockPath("issue"))
		if err != nil {
			t.Fatal(err)
		}
		if ok, err := r.store.TryLock(ctx, "issue"); ok || err != nil {
			t.Fatalf("TryLock while certmagic holds the lock = %v, %v; want false, nil", ok, err)
		}
		var released atomic.Bool
		got := lockAfter(t, r.store, "issue", &released)
		if now, err := os.ReadFile(r.lockPath("issue")); err != nil || string(now) != string(held) {
			t.Errorf("certmagic's lock file changed from %q to %q (%v) while it held it", held, now, err)
		}
		released.Store(true)
		if err := theirs.Unlock(ctx, "issue"); err != nil {
			t.Fatalf("certmagic Unlock: %v", err)
		}
		if err := <-got; err != nil {
			t.Fatalf("Lock after certmagic's Unlock: %v", err)
		}
		if err := r.store.Unlock(ctx, "issue"); err != nil {
			t.Fatalf("Unlock: %v", err)
		}
		if ws := r.logs.warnings(); len(ws) != 0 {
			t.Errorf("warnings: %v, want none", ws)
		}
	})
	t.Run("ours holds", func(t *testing.T) {
		r := newLockRig(t)
		ctx := t.Context()
		mustTryLock(t, r.store, "issue")
		theirs := &certmagic.FileStorage{Path: r.dir}
		if ok, err := theirs.TryLock(ctx, "issue"); ok || err != nil {
			t.Errorf("certmagic TryLock while ours holds the lock = %v, %v; want false, nil", ok, err)
			if ok {
				_ = theirs.Unlock(ctx, "issue")
			}
		}
		if err := r.store.Unlock(ctx, "issue"); err != nil {
			t.Fatalf("Unlock: %v", err)
		}
	})
}

// TestDirLockCancel: Lock on a held lock returns when its context ends,
// with the context's error and the lock file's path, and without the lock.
func TestDirLockCancel(t *testing.T) {
	r := newLockRig(t)
	mustTryLock(t, r.store, "issue")
	other := r.open(t)
	path := r.lockPath("issue")
	check := func(t *testing.T, err, want error) {
		t.Helper()
		if !errors.Is(err, want) || !strings.Contains(err.Error(), path) {
			t.Errorf("Lock = %v, want %v naming %s", err, want, path)
		}
	}

	t.Run("cancelled while waiting", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		result := make(chan error, 1)
		go func() { result <- other.Lock(ctx, "issue") }()
		cancel()
		check(t, <-result, context.Canceled)
	})
	t.Run("deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
		defer cancel()
		check(t, other.Lock(ctx, "issue"), context.DeadlineExceeded)
	})
	t.Run("ended before", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		// Even a free lock is not taken with an ended context.
		if err := other.Lock(ctx, "free"); !errors.Is(err, context.Canceled) {
			t.Errorf("Lock of a free lock with an ended context = %v, want context.Canceled", err)
		}
		if ok, err := other.TryLock(ctx, "free"); ok || !errors.Is(err, context.Canceled) {
			t.Errorf("TryLock with an ended context = %v, %v; want false, context.Canceled", ok, err)
		}
	})

	if err := other.Unlock(t.Context(), "issue"); err == nil {
		t.Error("Unlock on the store whose Lock was cancelled succeeded")
	}
	if err := r.store.Unlock(t.Context(), "issue"); err != nil {
		t.Errorf("Unlock by the holder: %v", err)
	}
}

// TestDirUnlockLeavesReplacedFile: if the lock file is removed while held
// (by hand, or by a process on certmagic's lock that found it stale since
// nothing refreshes it), another process may take the lock with a new
// file; the first holder's Unlock then warns and leaves that file alone,
// so the new holder keeps the lock.
func TestDirUnlockLeavesReplacedFile(t *testing.T) {
	r := newLockRig(t)
	a, b, c := r.store, r.open(t), r.open(t)
	path := r.lockPath("issue")
	mustTryLock(t, a, "issue")
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	mustTryLock(t, b, "issue")

	if err := a.Unlock(t.Context(), "issue"); err != nil {
		t.Fatalf("Unlock by the first holder: %v", err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("the new holder's lock file: %v", err)
	}
	if ok, err := c.TryLock(t.Context(), "issue"); ok || err != nil {
		t.Errorf("TryLock while the new holder holds the lock = %v, %v; want false, nil", ok, err)
	}
	ws := r.logs.warnings()
	if len(ws) != 1 || ws[0].attrs["file"] != path {
		t.Errorf("warnings: %v, want one naming file=%s", ws, path)
	}
	if err := b.Unlock(t.Context(), "issue"); err != nil {
		t.Fatalf("Unlock by the new holder: %v", err)
	}
}

// TestDirLockNoGoroutines: taking, waiting for, giving up on and releasing
// locks leaves no goroutine behind: a held lock is an open file, not a
// refresher.
func TestDirLockNoGoroutines(t *testing.T) {
	// Other tests' goroutines (certmagic's lock refresher) may be ending.
	ignore := goleak.IgnoreCurrent()
	r := newLockRig(t)
	a, b := r.store, r.open(t)
	ctx := t.Context()
	mustTryLock(t, a, "issue")

	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := b.Lock(short, "issue"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Lock with a short deadline = %v", err)
	}
	var released atomic.Bool
	got := lockAfter(t, b, "issue", &released)
	released.Store(true)
	if err := a.Unlock(ctx, "issue"); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if err := <-got; err != nil {
		t.Fatalf("waiting Lock: %v", err)
	}
	if err := b.Unlock(ctx, "issue"); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	goleak.VerifyNone(t, ignore)
}
