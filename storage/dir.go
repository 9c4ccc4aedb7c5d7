package storage

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/caddyserver/certmagic"
)

// DirOption configures [Dir] and [Default]. Each WithXxx function documents
// what happens without it.
type DirOption func(*dirConfig) error

type dirConfig struct {
	logger *slog.Logger
}

// WithLogger sets the logger of the store, which logs nothing but a warning
// when it repairs a lock file (see [Dir]); on platforms without flock(2) it
// logs nothing. Without it, [slog.Default] is used with the attribute
// subsystem=autotls.
func WithLogger(l *slog.Logger) DirOption {
	return func(c *dirConfig) error {
		if l == nil {
			return errors.New("WithLogger(nil): pass a *slog.Logger")
		}
		c.logger = l
		return nil
	}
}

// Dir returns an on-disk store rooted at path. Keys and values are files
// below path, stored, read, listed and deleted by a [certmagic.FileStorage]
// with the same layout byte for byte, so the directory can move between
// autotls, certmagic and earlier releases of autotls. Only the lock differs
// (see Locks below).
//
// A relative path is made absolute now, against the current working
// directory, so that a later os.Chdir does not move the store. The directory
// is created (with its missing parents) with permissions 0700 if it does not
// exist. The store writes certificates, private keys and metadata as 0600
// files in 0700 directories; its lock files, which hold only timestamps, are
// 0600 files in the same tree (on platforms without flock(2), 0644 less the
// umask, as certmagic creates them).
//
// Dir does not change the permissions of a directory that already exists:
// if path is readable by other users, so are the certificates and private
// keys stored there. Give Dir a directory that only the host's user can
// read (on Windows, permission bits are not enforced; rely on the directory's
// ACL, which under %LocalAppData% is the user's own by default).
//
// # Locks
//
// The store implements [certmagic.TryLocker] as well as Lock and Unlock. On
// Unix, a lock is an OS file lock (flock(2)) on the file certmagic uses for
// it, locks/<name>.lock below path. Stores on the same directory exclude
// each other, in one process or in several (on a network file system, as
// far as its flock(2) goes). The lock belongs to the open file,
// so it ends when its holder unlocks, exits or crashes: a process restarted
// after a crash takes it at once. No goroutine keeps it alive, so nothing
// outlives Unlock. Lock waits for a held lock by looking again, within
// milliseconds at first and then four times a second, until it is free or
// its context ends; it then returns the context's error (errors.Is works)
// with the lock file's path. Unlock removes the file, unless someone else
// has replaced it meanwhile (that is logged as a warning).
//
// Lock repairs what would otherwise block it for ever: a lock file holding
// garbage (a torn write) or dated more than a few seconds in the future
// (written by a host whose clock runs fast) is taken over with one warning
// naming the file; an empty directory in the lock file's place is removed
// with one warning; a directory with something in it makes Lock fail at
// once with an error naming it, for a person to remove.
//
// While held, the lock file also holds the record certmagic's own lock
// writes, {"created":…,"updated":…} (and "flock":true, which certmagic
// ignores), so a process on the same directory that still uses certmagic's
// lock, such as an earlier release of autotls during a rolling update,
// waits for it. Nothing refreshes that record, though: such a process finds
// the lock stale 10 s after it was taken, and may then take it too, so the
// exclusion against old releases holds for the first 10 s of a lock only.
// The other way round, Lock waits while such a process holds the lock and
// refreshed its file within the last 10 s, and takes over a file it left
// without refreshing for longer.
//
// On other platforms (Windows among them), the store uses certmagic's
// FileStorage lock unchanged: a lock file refreshed every 5 s by a
// goroutine that outlives Unlock by up to 5 s, and a lock left by a crash
// blocks for 10 s.
func Dir(path string, opts ...DirOption) (certmagic.Storage, error) {
	c := dirConfig{}
	for _, o := range opts {
		if o == nil {
			continue
		}
		if err := o(&c); err != nil {
			return nil, fmt.Errorf("storage: %w", err)
		}
	}
	if c.logger == nil {
		c.logger = slog.Default().With("subsystem", "autotls")
	}
	if path == "" {
		return nil, errors.New("storage: empty directory path")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("storage: making %q absolute: %w", path, err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("storage: creating directory: %w", err)
	}
	return newDirStore(&certmagic.FileStorage{Path: abs}, c.logger), nil
}

// dirStore, the store behind [Dir], is defined for each platform: with a
// lock of its own where there is flock(2) (flock_unix.go), certmagic's
// FileStorage elsewhere (flock_other.go).
var (
	_ certmagic.Storage   = (*dirStore)(nil)
	_ certmagic.TryLocker = (*dirStore)(nil)
)
