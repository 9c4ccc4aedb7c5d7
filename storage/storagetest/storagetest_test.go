package storagetest_test

import (
	"sync"
	"testing"

	"github.com/caddyserver/certmagic"
	"github.com/p2ptls/autotls/storage"
	"github.com/p2ptls/autotls/storage/storagetest"
)

func TestMemory(t *testing.T) {
	storagetest.Run(t, func(*testing.T) certmagic.Storage { return storage.Memory() }, storagetest.Options{})
}

func TestDir(t *testing.T) {
	var paths sync.Map // certmagic.Storage → its directory
	dir := func(t *testing.T, path string) certmagic.Storage {
		t.Helper()
		s, err := storage.Dir(path)
		if err != nil {
			t.Fatalf("Dir: %v", err)
		}
		paths.Store(s, path)
		return s
	}
	storagetest.Run(t, func(t *testing.T) certmagic.Storage { return dir(t, t.TempDir()) }, storagetest.Options{
		// Another store on the same directory is what another process
		// would use.
		Shared: func(t *testing.T, s certmagic.Storage) certmagic.Storage {
			path, _ := paths.Load(s)
			return dir(t, path.(string))
		},
		Skip: map[string]string{
			"MissingBelowFile": "certmagic.FileStorage reports a key below a file (a/file/x) " +
				"with ENOTDIR, not fs.ErrNotExist, from Load, Stat, List and Delete, and Exists says true",
		},
	})
}
