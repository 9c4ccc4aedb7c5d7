package postgres

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/jackc/pgx/v5"
)

// cleanKey canonicalizes key the way [certmagic.FileStorage] does through
// the file system: repeated, leading and trailing slashes and dot segments
// are removed. The root is "".
func cleanKey(key string) string {
	return strings.TrimPrefix(path.Clean("/"+key), "/")
}

// below returns the bounds of the keys strictly below the directory k:
// k+"/" <= key < k+"0" in byte order. Below the root, that is every key:
// "" <= key, with no upper bound (nil).
func below(k string) (lo string, hi *string) {
	if k == "" {
		return "", nil
	}
	h := k + "0"
	return k + "/", &h
}

// notExist returns an error for a missing key that satisfies
// errors.Is(err, fs.ErrNotExist).
func notExist(op, key string) error {
	return &fs.PathError{Op: op, Path: key, Err: fs.ErrNotExist}
}

// Store puts value at key, replacing any value there. Like a file system,
// it fails if key is a directory or if a directory above key is a file.
// (The check is part of the same statement, but two concurrent Stores, of
// a key and of a key below it, can both succeed; certmagic never does so.)
func (s *Storage) Store(ctx context.Context, key string, value []byte) error {
	k := cleanKey(key)
	if k == "" {
		return fmt.Errorf("postgres: storing %q: empty key", key)
	}
	if value == nil {
		value = []byte{} // bytea NOT NULL
	}
	var ancestors []string
	for p := path.Dir(k); p != "."; p = path.Dir(p) {
		ancestors = append(ancestors, p)
	}
	lo, hi := below(k)
	ctx, cancel := s.callCtx(ctx)
	defer cancel()
	tag, err := s.pool.Exec(ctx, s.q.store, k, value, lo, hi, ancestors)
	if err != nil {
		return fmt.Errorf("postgres: storing %q: %w", key, err)
	}
	if tag.RowsAffected() == 1 {
		return nil
	}
	// Refused: say why.
	var isDir bool
	if err := s.pool.QueryRow(ctx, s.q.storeConflict, lo, hi).Scan(&isDir); err != nil {
		return fmt.Errorf("postgres: storing %q: %w", key, err)
	}
	if isDir {
		return fmt.Errorf("postgres: storing %q: key is a directory", key)
	}
	return fmt.Errorf("postgres: storing %q: a directory above it is a file", key)
}

// Load returns the value at key.
func (s *Storage) Load(ctx context.Context, key string) ([]byte, error) {
	ctx, cancel := s.callCtx(ctx)
	defer cancel()
	var value []byte
	err := s.pool.QueryRow(ctx, s.q.load, cleanKey(key)).Scan(&value)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notExist("load", key)
	}
	if err != nil {
		return nil, fmt.Errorf("postgres: loading %q: %w", key, err)
	}
	if value == nil {
		value = []byte{}
	}
	return value, nil
}

// Delete removes key and, if it is a directory, everything below it. A
// missing key is not an error.
func (s *Storage) Delete(ctx context.Context, key string) error {
	k := cleanKey(key)
	lo, hi := below(k)
	ctx, cancel := s.callCtx(ctx)
	defer cancel()
	if _, err := s.pool.Exec(ctx, s.q.del, k, lo, hi); err != nil {
		return fmt.Errorf("postgres: deleting %q: %w", key, err)
	}
	return nil
}

// Exists reports whether key is a file or a directory. It reports false if
// the database cannot be asked.
func (s *Storage) Exists(ctx context.Context, key string) bool {
	k := cleanKey(key)
	if k == "" {
		return true
	}
	lo, hi := below(k)
	ctx, cancel := s.callCtx(ctx)
	defer cancel()
	var ok bool
	err := s.pool.QueryRow(ctx, s.q.exists, k, lo, hi).Scan(&ok)
	return err == nil && ok
}

// List returns the keys directly below the directory dir, files and
// directories alike, in byte order. With recursive, it returns every key
// below dir at any depth: the files and the directories between them, as
// [certmagic.FileStorage] does. Listing a file returns no keys; listing a
// missing key is an fs.ErrNotExist error.
func (s *Storage) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	d := cleanKey(dir)
	lo, hi := below(d)
	ctx, cancel := s.callCtx(ctx)
	defer cancel()
	rows, err := s.pool.Query(ctx, s.q.list, d, lo, hi)
	if err != nil {
		return nil, fmt.Errorf("postgres: listing %q: %w", dir, err)
	}
	files, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("postgres: listing %q: %w", dir, err)
	}
	if len(files) == 0 {
		if d == "" {
			return nil, nil
		}
		return nil, notExist("list", dir)
	}
	if files[0] == d { // a file; ORDER BY puts it first
		return nil, nil
	}
	return children(d, files, recursive), nil
}

// children returns the keys below dir that the sorted files below it make:
// with recursive, the files and every directory above them up to dir;
// otherwise the first path component below dir of each. The result is
// sorted and has no duplicates.
func children(dir string, files []string, recursive bool) []string {
	var keys []string
	for _, f := range files {
		rel := f
		if dir != "" {
			rel = f[len(dir)+1:]
		}
		if !recursive {
			first, _, _ := strings.Cut(rel, "/")
			keys = append(keys, path.Join(dir, first))
			continue
		}
		for i, c := range rel {
			if c == '/' {
				keys = append(keys, path.Join(dir, rel[:i]))
			}
		}
		keys = append(keys, f)
	}
	slices.Sort(keys)
	return slices.Compact(keys)
}

// Stat describes key: a file with its size and modification time (on the
// database's clock), or a directory (IsTerminal false, no size or time).
func (s *Storage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	k := cleanKey(key)
	if k == "" {
		return certmagic.KeyInfo{Key: key}, nil
	}
	lo, hi := below(k)
	ctx, cancel := s.callCtx(ctx)
	defer cancel()
	rows, err := s.pool.Query(ctx, s.q.stat, k, lo, hi)
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("postgres: stat %q: %w", key, err)
	}
	type row struct {
		Size     int64
		Modified *time.Time
		File     bool
	}
	found, err := pgx.CollectRows(rows, pgx.RowToStructByPos[row])
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("postgres: stat %q: %w", key, err)
	}
	for _, r := range found {
		if r.File {
			return certmagic.KeyInfo{Key: key, Modified: *r.Modified, Size: r.Size, IsTerminal: true}, nil
		}
	}
	if len(found) > 0 {
		return certmagic.KeyInfo{Key: key}, nil
	}
	return certmagic.KeyInfo{}, notExist("stat", key)
}
