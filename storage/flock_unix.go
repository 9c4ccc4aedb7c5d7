//go:build unix && !aix

package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"golang.org/x/sys/unix"
)

// How often Lock looks again while the lock is held elsewhere: soon at
// first, for a lock held briefly, then at most four times a second.
const (
	pollFirst = 5 * time.Millisecond
	pollMax   = 250 * time.Millisecond
)

// attempts bounds how often one try looks again at once after losing a race
// (the file removed or replaced between opening and locking it) before it
// reports the lock as busy.
const attempts = 3

// dirStore is certmagic's FileStorage with a lock of its own: an OS file
// lock on the file certmagic uses.
type dirStore struct {
	*certmagic.FileStorage
	log   *slog.Logger
	locks flocks
}

func newDirStore(fs *certmagic.FileStorage, log *slog.Logger) *dirStore {
	return &dirStore{FileStorage: fs, log: log}
}

// lockFilename is the file certmagic's FileStorage uses for the lock name.
func (s *dirStore) lockFilename(name string) string {
	return filepath.Join(s.Path, "locks", certmagic.StorageKeys.Safe(name)+".lock")
}

// flocks holds the open lock files of one store. The OS file lock lives as
// long as its open file: closing the file, or the process ending, releases
// it.
type flocks struct {
	mu sync.Mutex
	// held maps a lock's name to its open file; nil while a goroutine is
	// trying to take it, so that a store's own goroutines exclude each other
	// whatever happens to the file.
	held map[string]*os.File
}

// reserve marks name as being taken, unless it is held or being taken.
func (l *flocks) reserve(name string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, busy := l.held[name]; busy {
		return false
	}
	if l.held == nil {
		l.held = make(map[string]*os.File)
	}
	l.held[name] = nil
	return true
}

// settle ends a reservation: name is held with f, or, with a nil f, free.
func (l *flocks) settle(name string, f *os.File) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if f == nil {
		delete(l.held, name)
		return
	}
	l.held[name] = f
}

// release forgets and returns the file holding name, or nil if name is not
// held.
func (l *flocks) release(name string) *os.File {
	l.mu.Lock()
	defer l.mu.Unlock()
	f := l.held[name]
	if f != nil {
		delete(l.held, name)
	}
	return f
}

// Lock takes the named lock, waiting until it is free or ctx is done: see
// [Dir].
func (s *dirStore) Lock(ctx context.Context, name string) error {
	path := s.lockFilename(name)
	wait := pollFirst
	var timer *time.Timer
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("waiting for lock file %s: %w", path, err)
		}
		ok, err := s.tryLock(name, path)
		if err != nil || ok {
			return err
		}
		if timer == nil {
			timer = time.NewTimer(wait)
			defer timer.Stop()
		} else {
			timer.Reset(wait)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for lock file %s: %w", path, ctx.Err())
		case <-timer.C:
		}
		wait = min(2*wait, pollMax)
	}
}

// TryLock takes the named lock if it is free, without waiting: see [Dir].
func (s *dirStore) TryLock(ctx context.Context, name string) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	return s.tryLock(name, s.lockFilename(name))
}

// Unlock releases the named lock: it removes the lock file, then closes it,
// which releases the OS file lock. A process that opened the file before it
// was removed and locks it afterwards sees that it is gone and starts over.
func (s *dirStore) Unlock(_ context.Context, name string) error {
	path := s.lockFilename(name)
	f := s.locks.release(name)
	if f == nil {
		return fmt.Errorf("unlocking %s: lock is not held", path)
	}
	var err error
	if isOpenAt(f, path) {
		if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			err = fmt.Errorf("removing lock file: %w", rerr)
		}
	} else {
		// An operator, or a process using certmagic's lock that found the
		// file stale (nothing refreshes it), removed it. The file there now,
		// if any, is not ours to remove.
		s.log.Warn("lock file was removed or replaced while this process held it; another process may have held the lock at the same time", "file", path)
	}
	if cerr := f.Close(); cerr != nil && err == nil {
		err = fmt.Errorf("closing lock file: %w", cerr)
	}
	return err
}

// tryLock takes the named lock, whose file is path, if it is free.
func (s *dirStore) tryLock(name, path string) (bool, error) {
	if !s.locks.reserve(name) {
		return false, nil
	}
	f, err := s.acquire(path)
	s.locks.settle(name, f)
	return f != nil, err
}

// acquire returns the lock file at path, opened, OS-locked and marked as
// held, or nil if the lock is held elsewhere.
func (s *dirStore) acquire(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating the lock directory: %w", err)
	}
	for range attempts {
		f, err := s.open(path)
		if err != nil {
			return nil, err
		}
		if f == nil {
			continue // the path changed under us: look again
		}
		locked, err := flock(f)
		if err != nil || !locked {
			f.Close()
			return nil, err
		}
		if !isOpenAt(f, path) {
			// The holder removed the file (Unlock) between our open and our
			// lock: the file we hold is no longer the lock.
			f.Close()
			continue
		}
		taken, err := s.takeOver(f, path)
		if err != nil || !taken {
			f.Close()
			return nil, err
		}
		return f, nil
	}
	return nil, nil
}

// open opens the lock file at path, creating it if needed. It returns nil
// and no error if the caller should look again: a directory that stood
// there was removed, or the lock directory was.
func (s *dirStore) open(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	switch {
	case err == nil:
		return f, nil
	case errors.Is(err, unix.EISDIR):
		return nil, s.removeDir(path)
	case errors.Is(err, fs.ErrNotExist):
		return nil, nil
	default:
		return nil, fmt.Errorf("opening lock file: %w", err)
	}
}

// removeDir removes the empty directory at path, where the lock file
// belongs, or says why it cannot. Nothing ever creates a directory there;
// an empty one is removed, a full one is left for a person to look at.
func (s *dirStore) removeDir(path string) error {
	err := os.Remove(path)
	switch {
	case err == nil:
		s.log.Warn("lock file was an empty directory; removed it", "file", path)
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return nil // someone else removed it
	case errors.Is(err, unix.ENOTEMPTY) || errors.Is(err, unix.EEXIST):
		return fmt.Errorf("lock file %s is a directory, not empty: remove it to let the lock be taken", path)
	default:
		return fmt.Errorf("lock file %s is a directory: %w; remove it to let the lock be taken", path, err)
	}
}

// flock takes the OS file lock on f without waiting; it reports false if
// another open file holds it.
func flock(f *os.File) (bool, error) {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		switch {
		case err == nil:
			return true, nil
		case errors.Is(err, unix.EWOULDBLOCK):
			return false, nil
		case errors.Is(err, unix.EINTR):
			continue
		default:
			return false, fmt.Errorf("locking %s: %w", f.Name(), err)
		}
	}
}

// isOpenAt reports whether f is the file at path now.
func isOpenAt(f *os.File, path string) bool {
	held, err := f.Stat()
	if err != nil {
		return false
	}
	there, err := os.Stat(path)
	return err == nil && os.SameFile(held, there)
}

// takeOver decides, holding the OS file lock on f, whether its previous
// content lets this process have the lock, and if so marks it as held. It
// reports false if a process using certmagic's lock holds it.
func (s *dirStore) takeOver(f *os.File, path string) (bool, error) {
	content, err := io.ReadAll(io.LimitReader(f, maxLockFile+1))
	if err != nil {
		return false, fmt.Errorf("reading lock file: %w", err)
	}
	now := time.Now()
	state, at := judgeLock(content, now)
	if state == lockHeld {
		return false, nil
	}
	if err := f.Truncate(0); err != nil {
		return false, fmt.Errorf("writing lock file: %w", err)
	}
	if _, err := f.WriteAt(encodeLock(now), 0); err != nil {
		return false, fmt.Errorf("writing lock file: %w", err)
	}
	// As certmagic does: some network file systems leave a file empty to
	// other clients until it is synced.
	if err := f.Sync(); err != nil {
		return false, fmt.Errorf("writing lock file: %w", err)
	}
	switch state {
	case lockGarbage:
		s.log.Warn("lock file held garbage; treating it as stale and replacing it", "file", path)
	case lockFuture:
		s.log.Warn("lock file was dated in the future; treating it as stale and replacing it", "file", path, "dated", at)
	}
	return true, nil
}
