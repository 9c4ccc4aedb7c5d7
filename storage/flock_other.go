//go:build !unix || aix

package storage

import (
	"context"
	"log/slog"

	"github.com/caddyserver/certmagic"
)

// dirStore is certmagic's FileStorage, lock included: this platform has
// no flock(2). It logs nothing.
type dirStore struct {
	*certmagic.FileStorage
}

func newDirStore(fs *certmagic.FileStorage, _ *slog.Logger) *dirStore {
	return &dirStore{FileStorage: fs}
}

// Lock takes the named lock with certmagic's FileStorage lock: see [Dir].
func (s *dirStore) Lock(ctx context.Context, name string) error {
	return s.FileStorage.Lock(ctx, name)
}

// TryLock takes the named lock with certmagic's FileStorage lock if it is
// free: see [Dir].
func (s *dirStore) TryLock(ctx context.Context, name string) (bool, error) {
	return s.FileStorage.TryLock(ctx, name)
}

// Unlock releases the named lock taken with certmagic's FileStorage lock.
func (s *dirStore) Unlock(ctx context.Context, name string) error {
	return s.FileStorage.Unlock(ctx, name)
}
