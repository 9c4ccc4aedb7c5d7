package storage

import (
	"context"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
)

// Memory returns a new, empty in-memory store, safe for concurrent use.
//
// It keeps the whole [certmagic.Storage] contract with the same key
// semantics as [certmagic.FileStorage]: keys are '/'-separated paths,
// "directories" exist while they hold keys, Delete of a directory removes
// everything under it, and Load, Stat and List of a missing key return an
// error satisfying errors.Is(err, fs.ErrNotExist). Values are copied in and
// out. Lock blocks until the named lock is free or its context is done; the
// store also implements [certmagic.TryLocker].
//
// Everything is lost when the process exits: see the package documentation
// for why that matters outside of tests.
func Memory() certmagic.Storage {
	return &memory{
		files: make(map[string]memFile),
		locks: make(map[string]chan struct{}),
	}
}

// memory is the store behind [Memory].
type memory struct {
	mu sync.Mutex
	// files maps a cleaned key to its value; directories are implicit.
	files map[string]memFile
	// locks maps a held lock's name to a channel closed on Unlock.
	locks map[string]chan struct{}
}

// memFile is one stored value.
type memFile struct {
	value    []byte
	modified time.Time
}

var (
	_ certmagic.Storage   = (*memory)(nil)
	_ certmagic.TryLocker = (*memory)(nil)
)

// cleanKey canonicalizes key the way a file system path would be: repeated,
// leading and trailing slashes and dot segments are removed. The root is "".
func cleanKey(key string) string {
	return strings.TrimPrefix(path.Clean("/"+key), "/")
}

// under reports whether key lies strictly below the directory dir.
func under(key, dir string) bool {
	return dir == "" || strings.HasPrefix(key, dir+"/")
}

// isDir reports whether some file lies below key. Callers hold m.mu.
func (m *memory) isDir(key string) bool {
	for k := range m.files {
		if key != k && under(k, key) {
			return true
		}
	}
	return false
}

// Store puts a copy of value at key, replacing any value there. Like a file
// system, it fails if key is a directory or if a prefix of key is a file.
func (m *memory) Store(_ context.Context, key string, value []byte) error {
	k := cleanKey(key)
	if k == "" {
		return fmt.Errorf("storing %q: empty key", key)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.isDir(k) {
		return fmt.Errorf("storing %q: key is a directory", key)
	}
	for p := path.Dir(k); p != "."; p = path.Dir(p) {
		if _, ok := m.files[p]; ok {
			return fmt.Errorf("storing %q: %q is a file", key, p)
		}
	}
	m.files[k] = memFile{value: slices.Clone(value), modified: time.Now()}
	return nil
}

// Load returns a copy of the value at key.
func (m *memory) Load(_ context.Context, key string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	f, ok := m.files[cleanKey(key)]
	if !ok {
		return nil, notExist("loading", key)
	}
	if f.value == nil {
		return []byte{}, nil
	}
	return slices.Clone(f.value), nil
}

// Delete removes key and, if it is a directory, everything below it. A
// missing key is not an error.
func (m *memory) Delete(_ context.Context, key string) error {
	k := cleanKey(key)
	m.mu.Lock()
	defer m.mu.Unlock()
	for f := range m.files {
		if f == k || under(f, k) {
			delete(m.files, f)
		}
	}
	return nil
}

// Exists reports whether key is a file or a directory.
func (m *memory) Exists(_ context.Context, key string) bool {
	k := cleanKey(key)
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.files[k]
	return ok || k == "" || m.isDir(k)
}

// List returns the keys directly below the directory prefix, files and
// directories alike, or with recursive all keys below it at any depth, in
// lexical order. Listing a file returns nothing; listing a missing key is an
// fs.ErrNotExist error.
func (m *memory) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p := cleanKey(prefix)
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.files[p]; ok {
		return nil, nil
	}
	seen := make(map[string]bool)
	for k := range m.files {
		if !under(k, p) {
			continue
		}
		rel := strings.TrimPrefix(k, p+"/")
		if p == "" {
			rel = k
		}
		parts := strings.Split(rel, "/")
		if !recursive {
			parts = parts[:1]
		}
		for i := range parts {
			seen[path.Join(p, strings.Join(parts[:i+1], "/"))] = true
		}
	}
	if len(seen) == 0 && p != "" {
		return nil, notExist("listing", prefix)
	}
	keys := make([]string, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys, nil
}

// Stat describes key: a file with its size and modification time, or a
// directory (IsTerminal false).
func (m *memory) Stat(_ context.Context, key string) (certmagic.KeyInfo, error) {
	k := cleanKey(key)
	m.mu.Lock()
	defer m.mu.Unlock()
	if f, ok := m.files[k]; ok {
		return certmagic.KeyInfo{Key: key, Modified: f.modified, Size: int64(len(f.value)), IsTerminal: true}, nil
	}
	if k == "" || m.isDir(k) {
		return certmagic.KeyInfo{Key: key}, nil
	}
	return certmagic.KeyInfo{}, notExist("stat", key)
}

// Lock takes the named lock, waiting until it is free or ctx is done.
func (m *memory) Lock(ctx context.Context, name string) error {
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("waiting for lock %q: %w", name, err)
		}
		ok, held := m.tryLock(name)
		if ok {
			return nil
		}
		select {
		case <-held:
		case <-ctx.Done():
		}
	}
}

// TryLock takes the named lock if it is free, without waiting.
func (m *memory) TryLock(ctx context.Context, name string) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	ok, _ := m.tryLock(name)
	return ok, nil
}

// tryLock takes the named lock if it is free; otherwise it returns a
// channel that is closed when the holder unlocks.
func (m *memory) tryLock(name string) (bool, <-chan struct{}) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if held, ok := m.locks[name]; ok {
		return false, held
	}
	m.locks[name] = make(chan struct{})
	return true, nil
}

// Unlock releases the named lock. Releasing a lock that is not held is an
// error.
func (m *memory) Unlock(_ context.Context, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	held, ok := m.locks[name]
	if !ok {
		return fmt.Errorf("unlocking %q: lock is not held", name)
	}
	delete(m.locks, name)
	close(held)
	return nil
}

// String identifies the store in certmagic's log lines.
func (m *memory) String() string {
	return fmt.Sprintf("MemoryStorage:%p", m)
}

// notExist returns an error for a missing key that satisfies
// errors.Is(err, fs.ErrNotExist).
func notExist(op, key string) error {
	return &fs.PathError{Op: op, Path: key, Err: fs.ErrNotExist}
}
