package storagetest

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// clockSlack is how far a stored key's modification time may lie from the
// test's clock: file systems round times, and a database has its own clock.
const clockSlack = 5 * time.Second

// tree is the set of files most subtests store.
var tree = []string{
	"certs/ca/site/site.crt",
	"certs/ca/site/site.key",
	"certs/ca/other/o.crt",
	"certs/ca2/x.crt",
	"certs/top.json",
	"acme/account.json",
}

// fill stores each key with its own name as the value.
func fill(t *testing.T, s certmagic.Storage, keys ...string) {
	t.Helper()
	for _, k := range keys {
		if err := s.Store(t.Context(), k, []byte(k)); err != nil {
			t.Fatalf("Store(%q): %v", k, err)
		}
	}
}

// mustLoad loads key and fails the test unless its value is want.
func mustLoad(t *testing.T, s certmagic.Storage, key string, want []byte) {
	t.Helper()
	got, err := s.Load(t.Context(), key)
	if err != nil {
		t.Fatalf("Load(%q): %v", key, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("Load(%q) = %s, want %s", key, summary(got), summary(want))
	}
}

// mustNotExist fails the test unless key is gone for Load, Stat and Exists.
func mustNotExist(t *testing.T, s certmagic.Storage, key string) {
	t.Helper()
	if _, err := s.Load(t.Context(), key); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load(%q): got error %v, want fs.ErrNotExist", key, err)
	}
	if _, err := s.Stat(t.Context(), key); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Stat(%q): got error %v, want fs.ErrNotExist", key, err)
	}
	if s.Exists(t.Context(), key) {
		t.Errorf("Exists(%q) = true, want false", key)
	}
}

// summary shows a value briefly: long values by length and first byte.
func summary(v []byte) string {
	if len(v) <= 32 {
		return fmt.Sprintf("%q", v)
	}
	return fmt.Sprintf("%d bytes starting %q", len(v), v[:8])
}

// mustList lists dir and fails the test unless it gets exactly want, in any
// order, without duplicates.
func mustList(t *testing.T, s certmagic.Storage, dir string, recursive bool, want ...string) {
	t.Helper()
	got, err := s.List(t.Context(), dir, recursive)
	if err != nil {
		t.Fatalf("List(%q, %v): %v", dir, recursive, err)
	}
	if g, w := slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(want)); !slices.Equal(g, w) {
		t.Errorf("List(%q, %v) = %q, want %q", dir, recursive, g, w)
	}
}

// storeLoad: Load returns what Store stored, for empty, binary and large
// values, and the latest of two Stores.
func (r runner) storeLoad(t *testing.T) {
	s := r.newStorage(t)
	binary := make([]byte, 256)
	for i := range binary {
		binary[i] = byte(i)
	}
	for _, c := range []struct {
		name  string
		key   string
		value []byte
	}{
		{"empty", "values/empty", []byte{}},
		{"binary", "values/binary", binary},
		{"text", "values/deep/er/text.pem", []byte("-----BEGIN CERTIFICATE-----\n")},
		{"large", "values/large", bytes.Repeat(binary, 1024)},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := s.Store(t.Context(), c.key, c.value); err != nil {
				t.Fatalf("Store: %v", err)
			}
			mustLoad(t, s, c.key, c.value)
		})
	}
	t.Run("overwrite", func(t *testing.T) {
		fill(t, s, "values/over")
		if err := s.Store(t.Context(), "values/over", []byte("new")); err != nil {
			t.Fatalf("Store: %v", err)
		}
		mustLoad(t, s, "values/over", []byte("new"))
	})
}

// copySemantics: the store keeps its own copy of what it is given and
// returns a copy of what it keeps.
func (r runner) copySemantics(t *testing.T) {
	s := r.newStorage(t)
	v := []byte("original")
	if err := s.Store(t.Context(), "k", v); err != nil {
		t.Fatalf("Store: %v", err)
	}
	v[0] = 'X'
	mustLoad(t, s, "k", []byte("original"))
	got, err := s.Load(t.Context(), "k")
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	got[0] = 'Y'
	mustLoad(t, s, "k", []byte("original"))
}

// missing: Load, Stat and List of a missing key fail with fs.ErrNotExist;
// Delete of one succeeds; Exists reports false.
func (r runner) missing(t *testing.T) {
	r.checkMissing(t, "absent", "absent/file", "present/absent")
}

// missingBelowFile: a key below a file is missing like any other.
func (r runner) missingBelowFile(t *testing.T) {
	r.checkMissing(t, "present/file/below", "present/file/below/deeper")
}

// checkMissing checks missing keys in a store that holds present/file.
func (r runner) checkMissing(t *testing.T, keys ...string) {
	s := r.newStorage(t)
	fill(t, s, "present/file")
	for _, key := range keys {
		mustNotExist(t, s, key)
		if _, err := s.List(t.Context(), key, false); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("List(%q, false): got error %v, want fs.ErrNotExist", key, err)
		}
		if _, err := s.List(t.Context(), key, true); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("List(%q, true): got error %v, want fs.ErrNotExist", key, err)
		}
		if err := s.Delete(t.Context(), key); err != nil {
			t.Errorf("Delete(%q) of a missing key: %v, want nil", key, err)
		}
	}
	mustLoad(t, s, "present/file", []byte("present/file"))
}

// keys: keys are '/'-separated paths and a directory is a prefix of whole
// components: "a" is a directory of "a/b" but not of "ab/c", and neither
// byte order neighbours of '/' ('.' and '0') nor LIKE wildcards ('%', '_')
// leak into a directory.
func (r runner) keys(t *testing.T) {
	s := r.newStorage(t)
	fill(t, s, "a/b", "a/ü/x", "ab/c", "a0", "a.b", "x%/1", "x_/2", "xy/3")

	for key, want := range map[string]bool{
		"a": true, "a/b": true, "a/ü": true, "ab": true, "a0": true, "x%": true, "x_": true,
		"a/c": false, "x": false, "x%/2": false, "b": false,
	} {
		if got := s.Exists(t.Context(), key); got != want {
			t.Errorf("Exists(%q) = %v, want %v", key, got, want)
		}
	}
	mustList(t, s, "a", false, "a/b", "a/ü")
	mustList(t, s, "x%", true, "x%/1")
	mustList(t, s, "x_", true, "x_/2")
	if info, err := s.Stat(t.Context(), "a"); err != nil || info.IsTerminal {
		t.Errorf("Stat(%q) = %+v, %v; want a directory", "a", info, err)
	}

	if err := s.Delete(t.Context(), "x_"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	mustNotExist(t, s, "x_/2")
	mustLoad(t, s, "x%/1", []byte("x%/1"))
	mustLoad(t, s, "xy/3", []byte("xy/3"))

	if err := s.Delete(t.Context(), "a"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	mustNotExist(t, s, "a/b")
	mustNotExist(t, s, "a/ü/x")
	mustNotExist(t, s, "a")
	for _, k := range []string{"ab/c", "a0", "a.b"} {
		mustLoad(t, s, k, []byte(k))
	}
}

// list: a non-recursive List returns the direct children of a directory,
// files and directories; a recursive one returns every file below it,
// and may add the directories between (certmagic.FileStorage does), but
// nothing else.
func (r runner) list(t *testing.T) {
	s := r.newStorage(t)
	fill(t, s, tree...)
	mustList(t, s, "certs", false, "certs/ca", "certs/ca2", "certs/top.json")
	mustList(t, s, "certs/ca", false, "certs/ca/other", "certs/ca/site")
	mustList(t, s, "certs/ca/site", false, "certs/ca/site/site.crt", "certs/ca/site/site.key")

	got, err := s.List(t.Context(), "certs", true)
	if err != nil {
		t.Fatalf("List(certs, true): %v", err)
	}
	files := make(map[string]bool) // below certs
	dirs := make(map[string]bool)  // below certs, above a file
	for _, f := range tree {
		if !strings.HasPrefix(f, "certs/") {
			continue
		}
		files[f] = true
		for i := len("certs/"); i < len(f); i++ {
			if f[i] == '/' {
				dirs[f[:i]] = true
			}
		}
	}
	seen := make(map[string]bool)
	for _, k := range got {
		if seen[k] {
			t.Errorf("List(certs, true): %q listed twice", k)
		}
		seen[k] = true
		if !files[k] && !dirs[k] {
			t.Errorf("List(certs, true): %q is not below certs", k)
		}
	}
	for _, f := range slices.Sorted(maps.Keys(files)) {
		if !seen[f] {
			t.Errorf("List(certs, true) = %q, missing %q", got, f)
		}
	}
}

// stat: Stat of a file gives its key, size and a recent modification
// time; of a directory, IsTerminal false.
func (r runner) stat(t *testing.T) {
	s := r.newStorage(t)
	before := time.Now()
	if err := s.Store(t.Context(), "dir/file", []byte("12345")); err != nil {
		t.Fatalf("Store: %v", err)
	}
	after := time.Now()
	info, err := s.Stat(t.Context(), "dir/file")
	if err != nil {
		t.Fatalf("Stat(file): %v", err)
	}
	if info.Key != "dir/file" || !info.IsTerminal || info.Size != 5 {
		t.Errorf("Stat(file) = %+v, want Key dir/file, IsTerminal, Size 5", info)
	}
	if info.Modified.Before(before.Add(-clockSlack)) || info.Modified.After(after.Add(clockSlack)) {
		t.Errorf("Stat(file).Modified = %v, want between %v and %v (±%v)", info.Modified, before, after, clockSlack)
	}
	info, err = s.Stat(t.Context(), "dir")
	if err != nil {
		t.Fatalf("Stat(dir): %v", err)
	}
	if info.Key != "dir" || info.IsTerminal {
		t.Errorf("Stat(dir) = %+v, want Key dir, not IsTerminal", info)
	}
}

// delete: Delete of a file removes it alone; of a directory, everything
// below it and nothing else; twice is no error.
func (r runner) delete(t *testing.T) {
	s := r.newStorage(t)
	fill(t, s, tree...)
	if err := s.Delete(t.Context(), "certs/ca/site/site.crt"); err != nil {
		t.Fatalf("Delete(file): %v", err)
	}
	mustNotExist(t, s, "certs/ca/site/site.crt")
	mustLoad(t, s, "certs/ca/site/site.key", []byte("certs/ca/site/site.key"))

	for range 2 {
		if err := s.Delete(t.Context(), "certs/ca"); err != nil {
			t.Fatalf("Delete(dir): %v", err)
		}
	}
	for _, k := range []string{"certs/ca/site/site.key", "certs/ca/other/o.crt", "certs/ca/site", "certs/ca"} {
		mustNotExist(t, s, k)
	}
	if _, err := s.List(t.Context(), "certs/ca", true); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("List of a deleted directory: got error %v, want fs.ErrNotExist", err)
	}
	for _, k := range []string{"certs/ca2/x.crt", "certs/top.json", "acme/account.json"} {
		mustLoad(t, s, k, []byte(k))
	}
	if !s.Exists(t.Context(), "certs") {
		t.Error("Exists(certs) = false after deleting one of its directories")
	}
}

// concurrentWrites: writers to the same key and to keys of their own, with
// readers alongside, never tear a value; once they are done each key holds
// a value written last by one of them, and a later Store wins.
func (r runner) concurrentWrites(t *testing.T) {
	s := r.newStorage(t)
	const writers, rounds, size = 4, 8, 32 << 10
	value := func(w, i int) []byte { return bytes.Repeat([]byte{byte(1 + w*rounds + i)}, size) }
	uniform := func(v []byte) bool {
		return len(v) == size && bytes.Count(v, v[:1]) == size
	}

	var writing, reading sync.WaitGroup
	done := make(chan struct{})
	errs := make(chan error, 100)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	for w := range writers {
		writing.Go(func() {
			for i := range rounds {
				if err := s.Store(t.Context(), "shared", value(w, i)); err != nil {
					report(fmt.Errorf("Store(shared): %w", err))
				}
				if err := s.Store(t.Context(), fmt.Sprintf("own/%d", w), value(w, i)); err != nil {
					report(fmt.Errorf("Store(own): %w", err))
				}
			}
		})
	}
	for range 2 {
		reading.Go(func() {
			for {
				select {
				case <-done:
					return
				default:
				}
				v, err := s.Load(t.Context(), "shared")
				switch {
				case errors.Is(err, fs.ErrNotExist): // not written yet
				case err != nil:
					report(fmt.Errorf("Load(shared): %w", err))
				case !uniform(v):
					report(fmt.Errorf("Load(shared) during writes: torn value, %s", summary(v)))
				}
			}
		})
	}
	writing.Wait()
	close(done)
	reading.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	v, err := s.Load(t.Context(), "shared")
	if err != nil || !uniform(v) {
		t.Errorf("Load(shared) after the writes = %s, %v; want one writer's value", summary(v), err)
	}
	for w := range writers {
		mustLoad(t, s, fmt.Sprintf("own/%d", w), value(w, rounds-1))
	}
	final := []byte("final")
	if err := s.Store(t.Context(), "shared", final); err != nil {
		t.Fatalf("Store: %v", err)
	}
	mustLoad(t, s, "shared", final)
}

// shared: what one store writes, a store over the same data reads.
func (r runner) shared(t *testing.T) {
	if r.opts.Shared == nil {
		t.Skip("Options.Shared is not set")
	}
	a := r.newStorage(t)
	b := r.opts.Shared(t, a)
	fill(t, a, tree...)
	for _, k := range tree {
		mustLoad(t, b, k, []byte(k))
	}
	if err := b.Store(t.Context(), "certs/top.json", []byte("from b")); err != nil {
		t.Fatalf("Store: %v", err)
	}
	mustLoad(t, a, "certs/top.json", []byte("from b"))
	if err := b.Delete(t.Context(), "certs/ca"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	mustNotExist(t, a, "certs/ca/site/site.crt")
	mustList(t, a, "certs", false, "certs/ca2", "certs/top.json")
}
