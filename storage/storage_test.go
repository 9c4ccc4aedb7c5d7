package storage

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// stores returns the stores every contract test runs against.
func stores(t *testing.T) map[string]certmagic.Storage {
	t.Helper()
	dir, err := Dir(t.TempDir())
	if err != nil {
		t.Fatalf("Dir: %v", err)
	}
	return map[string]certmagic.Storage{"Memory": Memory(), "Dir": dir}
}

func TestContractMissingKeys(t *testing.T) {
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := t.Context()
			if _, err := s.Load(ctx, "no/such.key"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("Load: got %v, want fs.ErrNotExist", err)
			}
			if _, err := s.Stat(ctx, "no/such.key"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("Stat: got %v, want fs.ErrNotExist", err)
			}
			if _, err := s.List(ctx, "no", true); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("List: got %v, want fs.ErrNotExist", err)
			}
			if s.Exists(ctx, "no/such.key") {
				t.Error("Exists: true for a missing key")
			}
			if err := s.Delete(ctx, "no/such.key"); err != nil {
				t.Errorf("Delete of a missing key: %v", err)
			}
		})
	}
}

// fill stores a small tree and returns its files with their values.
func fill(t *testing.T, s certmagic.Storage) map[string][]byte {
	t.Helper()
	files := map[string][]byte{
		"certs/ca/site/site.crt":  []byte("certificate"),
		"certs/ca/site/site.key":  []byte("private key"),
		"certs/ca/site/site.json": []byte("{}"),
		"certs/ca/other/o.crt":    []byte("other"),
		"acme/account.json":       []byte("account"),
		"top":                     {},
	}
	for k, v := range files {
		if err := s.Store(t.Context(), k, v); err != nil {
			t.Fatalf("Store(%q): %v", k, err)
		}
	}
	return files
}

func TestContractStoreLoad(t *testing.T) {
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := t.Context()
			for k, want := range fill(t, s) {
				got, err := s.Load(ctx, k)
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("Load(%q) = %q, %v; want %q", k, got, err, want)
				}
			}

			value := []byte("v1")
			if err := s.Store(ctx, "certs/ca/site/site.crt", value); err != nil {
				t.Fatalf("overwriting: %v", err)
			}
			value[0] = 'X' // the store must have kept its own copy
			got, err := s.Load(ctx, "certs/ca/site/site.crt")
			if err != nil || string(got) != "v1" {
				t.Fatalf("after overwrite Load = %q, %v; want \"v1\"", got, err)
			}
			got[0] = 'Y' // and must hand out a copy
			if again, _ := s.Load(ctx, "certs/ca/site/site.crt"); string(again) != "v1" {
				t.Errorf("Load after mutating a loaded value = %q, want \"v1\"", again)
			}
		})
	}
}

func TestContractStoreConflicts(t *testing.T) {
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			fill(t, s)
			if err := s.Store(t.Context(), "top/below", []byte("x")); err == nil {
				t.Error("Store below a file succeeded")
			}
			if err := s.Store(t.Context(), "certs/ca", []byte("x")); err == nil {
				t.Error("Store over a directory succeeded")
			}
		})
	}
}

func TestContractExistsStat(t *testing.T) {
	tests := []struct {
		key      string
		terminal bool
		size     int64
	}{
		{"certs", false, -1},
		{"certs/ca/site", false, -1},
		{"certs/ca/site/site.key", true, int64(len("private key"))},
		{"top", true, 0},
	}
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			fill(t, s)
			for _, tt := range tests {
				t.Run(tt.key, func(t *testing.T) {
					if !s.Exists(t.Context(), tt.key) {
						t.Error("Exists = false")
					}
					info, err := s.Stat(t.Context(), tt.key)
					if err != nil {
						t.Fatalf("Stat: %v", err)
					}
					if info.Key != tt.key || info.IsTerminal != tt.terminal {
						t.Errorf("Stat = %+v, want key %q terminal %v", info, tt.key, tt.terminal)
					}
					if tt.terminal && (info.Size != tt.size || info.Modified.IsZero()) {
						t.Errorf("Stat = %+v, want size %d and a modification time", info, tt.size)
					}
				})
			}
		})
	}
}

func TestContractList(t *testing.T) {
	tests := []struct {
		name      string
		prefix    string
		recursive bool
		want      []string
	}{
		{"directory", "certs/ca", false, []string{"certs/ca/other", "certs/ca/site"}},
		{"files", "certs/ca/site", false, []string{"certs/ca/site/site.crt", "certs/ca/site/site.json", "certs/ca/site/site.key"}},
		{"recursive", "certs", true, []string{
			"certs/ca", "certs/ca/other", "certs/ca/other/o.crt",
			"certs/ca/site", "certs/ca/site/site.crt", "certs/ca/site/site.json", "certs/ca/site/site.key",
		}},
		{"file", "acme/account.json", true, nil},
	}
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			fill(t, s)
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					got, err := s.List(t.Context(), tt.prefix, tt.recursive)
					if err != nil {
						t.Fatalf("List: %v", err)
					}
					slices.Sort(got)
					if !slices.Equal(got, tt.want) {
						t.Errorf("List(%q, %v) = %q, want %q", tt.prefix, tt.recursive, got, tt.want)
					}
				})
			}
		})
	}
}

func TestContractDelete(t *testing.T) {
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := t.Context()
			fill(t, s)
			if err := s.Delete(ctx, "certs/ca/site/site.key"); err != nil {
				t.Fatalf("Delete file: %v", err)
			}
			if s.Exists(ctx, "certs/ca/site/site.key") {
				t.Error("deleted file still exists")
			}
			if !s.Exists(ctx, "certs/ca/site/site.crt") {
				t.Error("Delete of a file removed its sibling")
			}
			if err := s.Delete(ctx, "certs"); err != nil {
				t.Fatalf("Delete directory: %v", err)
			}
			for _, k := range []string{"certs", "certs/ca", "certs/ca/other/o.crt"} {
				if s.Exists(ctx, k) {
					t.Errorf("%q exists after deleting its directory", k)
				}
			}
			if !s.Exists(ctx, "acme/account.json") {
				t.Error("Delete of a directory removed a key outside it")
			}
		})
	}
}

func TestContractLock(t *testing.T) {
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := t.Context()
			if err := s.Lock(ctx, "issue_cert_x"); err != nil {
				t.Fatalf("Lock: %v", err)
			}

			acquired := make(chan error, 1)
			go func() { acquired <- s.Lock(ctx, "issue_cert_x") }()
			select {
			case err := <-acquired:
				t.Fatalf("second Lock returned (%v) while the lock was held", err)
			case <-time.After(200 * time.Millisecond):
			}

			// A different name is independent.
			if err := s.Lock(ctx, "issue_cert_y"); err != nil {
				t.Fatalf("Lock of another name: %v", err)
			}
			if err := s.Unlock(ctx, "issue_cert_y"); err != nil {
				t.Fatalf("Unlock of another name: %v", err)
			}

			if err := s.Unlock(ctx, "issue_cert_x"); err != nil {
				t.Fatalf("Unlock: %v", err)
			}
			select {
			case err := <-acquired:
				if err != nil {
					t.Fatalf("second Lock: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("second Lock still blocked after Unlock")
			}
			if err := s.Unlock(ctx, "issue_cert_x"); err != nil {
				t.Fatalf("second Unlock: %v", err)
			}
		})
	}
}

func TestContractLockCancel(t *testing.T) {
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			if err := s.Lock(t.Context(), "held"); err != nil {
				t.Fatalf("Lock: %v", err)
			}
			t.Cleanup(func() { _ = s.Unlock(context.Background(), "held") })

			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan error, 1)
			go func() { done <- s.Lock(ctx, "held") }()
			cancel()
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) {
					t.Errorf("Lock with a cancelled context = %v, want context.Canceled", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Lock ignored the cancelled context")
			}
		})
	}
}

func TestContractTryLock(t *testing.T) {
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			tl, ok := s.(certmagic.TryLocker)
			if !ok {
				t.Fatal("the store does not implement certmagic.TryLocker")
			}
			ctx := t.Context()
			if got, err := tl.TryLock(ctx, "x"); !got || err != nil {
				t.Fatalf("first TryLock = %v, %v; want true, nil", got, err)
			}
			if got, err := tl.TryLock(ctx, "x"); got || err != nil {
				t.Fatalf("second TryLock = %v, %v; want false, nil", got, err)
			}
			if err := s.Unlock(ctx, "x"); err != nil {
				t.Fatalf("Unlock: %v", err)
			}
			if got, err := tl.TryLock(ctx, "x"); !got || err != nil {
				t.Fatalf("TryLock after Unlock = %v, %v; want true, nil", got, err)
			}
			if err := s.Unlock(ctx, "x"); err != nil {
				t.Fatalf("second Unlock: %v", err)
			}
		})
	}
}

func TestContractUnlockNotHeld(t *testing.T) {
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			if err := s.Unlock(t.Context(), "never"); err == nil {
				t.Error("Unlock of a lock never taken succeeded")
			}
		})
	}
}

func TestMemoryConcurrent(t *testing.T) {
	s := Memory()
	ctx := t.Context()
	done := make(chan struct{})
	for i := range 8 {
		go func() {
			defer func() { done <- struct{}{} }()
			key := "dir/" + strings.Repeat("k", i+1)
			for j := range 100 {
				if err := s.Store(ctx, key, []byte{byte(j)}); err != nil {
					t.Errorf("Store: %v", err)
					return
				}
				if _, err := s.Load(ctx, key); err != nil {
					t.Errorf("Load: %v", err)
					return
				}
				if _, err := s.List(ctx, "dir", true); err != nil {
					t.Errorf("List: %v", err)
					return
				}
			}
		}()
	}
	for range 8 {
		<-done
	}
	got, err := s.List(ctx, "dir", false)
	if err != nil || len(got) != 8 {
		t.Errorf("List = %q, %v; want 8 keys", got, err)
	}
}

func TestDirPermissions(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("permission bits are not enforced on Windows")
	}
	root := filepath.Join(t.TempDir(), "new", "store")
	s, err := Dir(root)
	if err != nil {
		t.Fatalf("Dir: %v", err)
	}
	name := "*.k51qzi5uqu5djejcj9das04p3wen7mowcz0z5iq3tw0yxaa8ko01odjley7fdg.libp2p.direct"
	for _, key := range []string{
		certmagic.StorageKeys.SitePrivateKey("acme-v02.api.letsencrypt.org-directory", name),
		certmagic.StorageKeys.SiteCert("acme-v02.api.letsencrypt.org-directory", name),
		certmagic.StorageKeys.SiteMeta("acme-v02.api.letsencrypt.org-directory", name),
	} {
		if err := s.Store(t.Context(), key, []byte("secret")); err != nil {
			t.Fatalf("Store(%q): %v", key, err)
		}
	}

	var files int
	err = filepath.WalkDir(filepath.Dir(root), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		want := fs.FileMode(0o600)
		if d.IsDir() {
			want = 0o700 | fs.ModeDir
		} else {
			files++
		}
		if info.Mode() != want {
			t.Errorf("%s: mode %v, want %v", p, info.Mode(), want)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walking the store: %v", err)
	}
	if files != 3 {
		t.Errorf("found %d files, want 3", files)
	}
}

func TestDirRelativePath(t *testing.T) {
	base := t.TempDir()
	t.Chdir(base)
	s, err := Dir(filepath.Join("rel", "store"))
	if err != nil {
		t.Fatalf("Dir: %v", err)
	}
	t.Chdir(t.TempDir()) // the store must not follow the working directory
	if err := s.Store(t.Context(), "a/b", []byte("x")); err != nil {
		t.Fatalf("Store: %v", err)
	}
	if _, err := os.Stat(filepath.Join(base, "rel", "store", "a", "b")); err != nil {
		t.Errorf("value not under the directory given at construction: %v", err)
	}
	ds, ok := s.(*dirStore)
	if !ok || !filepath.IsAbs(ds.Path) {
		t.Errorf("Dir returned %#v, want a store with an absolute path", s)
	}
}

func TestDirErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, path string
		opts       []DirOption
	}{
		{"empty", "", nil},
		{"below a file", filepath.Join(file, "store"), nil},
		{"nil logger", t.TempDir(), []DirOption{WithLogger(nil)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if s, err := Dir(tt.path, tt.opts...); err == nil {
				t.Errorf("Dir(%q) = %v, want an error", tt.path, s)
			}
		})
	}
}

func TestDefaultDirInjected(t *testing.T) {
	noConfig := func() (string, error) { return "", errors.New("no config dir") }
	config := func() (string, error) { return "/cfg", nil }
	tests := []struct {
		name    string
		goos    string
		env     map[string]string
		config  func() (string, error)
		want    string // empty: an error is expected
		wantErr string
	}{
		{"linux XDG", "linux", map[string]string{"XDG_DATA_HOME": "/xdg", "HOME": "/home/u"}, noConfig, "/xdg/autotls", ""},
		{"linux relative XDG ignored", "linux", map[string]string{"XDG_DATA_HOME": "xdg", "HOME": "/home/u"}, noConfig, "/home/u/.local/share/autotls", ""},
		{"freebsd HOME", "freebsd", map[string]string{"HOME": "/home/u"}, noConfig, "/home/u/.local/share/autotls", ""},
		{"linux nothing", "linux", nil, config, "", "WithStorage"},
		{"linux relative HOME", "linux", map[string]string{"HOME": "home"}, config, "", "not an absolute path"},
		{"darwin", "darwin", map[string]string{"XDG_DATA_HOME": "/xdg"}, config, "/cfg/autotls", ""},
		{"darwin no config", "darwin", nil, noConfig, "", "no config dir"},
		{"windows LocalAppData", "windows", map[string]string{"LocalAppData": "/local"}, config, "/local/autotls", ""},
		{"windows AppData", "windows", nil, config, "/cfg/autotls", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			getenv := func(k string) string { return tt.env[k] }
			got, err := defaultDir(tt.goos, getenv, tt.config)
			if tt.want == "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("defaultDir = %q, %v; want an error containing %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != filepath.FromSlash(tt.want) {
				t.Errorf("defaultDir = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestDefaultDirEnvironment(t *testing.T) {
	switch runtime.GOOS {
	case "windows", "darwin", "ios", "plan9", "js", "wasip1":
		t.Skip("XDG layout applies to Linux and the BSDs")
	}
	home := t.TempDir()
	t.Setenv("HOME", home)
	t.Setenv("XDG_DATA_HOME", "")
	got, err := DefaultDir()
	if want := filepath.Join(home, ".local", "share", "autotls"); err != nil || got != want {
		t.Errorf("with HOME: DefaultDir = %q, %v; want %q", got, err, want)
	}

	xdg := t.TempDir()
	t.Setenv("XDG_DATA_HOME", xdg)
	got, err = DefaultDir()
	if want := filepath.Join(xdg, "autotls"); err != nil || got != want {
		t.Errorf("with XDG_DATA_HOME: DefaultDir = %q, %v; want %q", got, err, want)
	}

	s, err := Default()
	if err != nil {
		t.Fatalf("Default: %v", err)
	}
	if err := s.Store(t.Context(), "k", []byte("v")); err != nil {
		t.Fatalf("Store: %v", err)
	}
	if _, err := os.Stat(filepath.Join(xdg, "autotls", "k")); err != nil {
		t.Errorf("Default does not store in DefaultDir: %v", err)
	}
}
