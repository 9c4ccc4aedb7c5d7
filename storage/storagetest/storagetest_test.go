package storagetest_test

import (
	"testing"

	"github.com/caddyserver/certmagic"
	"github.com/p2ptls/autotls/storage"
	"github.com/p2ptls/autotls/storage/storagetest"
)

func TestMemory(t *testing.T) {
	storagetest.Run(t, func(*testing.T) certmagic.Storage { return storage.Memory() }, storagetest.Options{})
}

func TestDir(t *testing.T) {
	dir := func(t *testing.T, path string) certmagic.Storage {
		t.Helper()
		s, err := storage.Dir(path)
		if err != nil {
			t.Fatalf("Dir: %v", err)
		}
		return s
	}
	storagetest.Run(t, func(t *testing.T) certmagic.Storage { return dir(t, t.TempDir()) }, storagetest.Options{
		// Another FileStorage on the same directory is what another
		// process would use.
		Shared: func(t *testing.T, s certmagic.Storage) certmagic.Storage {
			return dir(t, s.(*certmagic.FileStorage).Path)
		},
		Skip: map[string]string{
			"MissingBelowFile": "certmagic.FileStorage reports a key below a file (a/file/x) " +
				"with ENOTDIR, not fs.ErrNotExist, from Load, Stat, List and Delete, and Exists says true",
		},
	})
}
