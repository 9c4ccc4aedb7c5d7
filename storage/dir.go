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

// WithLogger sets the logger of the store, for the warnings of its lock (it
// logs nothing yet). Without it, [slog.Default] is used with the attribute
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
// (certmagic's FileStorage lock for now).
//
// A relative path is made absolute now, against the current working
// directory, so that a later os.Chdir does not move the store. The directory
// is created (with its missing parents) with permissions 0700 if it does not
// exist. The store writes certificates, private keys and metadata as 0600
// files in 0700 directories; its lock files, which hold only timestamps, are
// created 0644 less the umask, inside the same 0700 tree.
//
// Dir does not change the permissions of a directory that already exists:
// if path is readable by other users, so are the certificates and private
// keys stored there. Give Dir a directory that only the host's user can
// read (on Windows, permission bits are not enforced; rely on the directory's
// ACL, which under %LocalAppData% is the user's own by default).
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
	return &dirStore{FileStorage: &certmagic.FileStorage{Path: abs}, log: c.logger}, nil
}

// dirStore is the store behind [Dir]: certmagic's FileStorage, with the
// logger its lock is to use.
type dirStore struct {
	*certmagic.FileStorage
	log *slog.Logger
}

var (
	_ certmagic.Storage   = (*dirStore)(nil)
	_ certmagic.TryLocker = (*dirStore)(nil)
)
