// Package pgtest keeps the tests of different packages that use the
// PostgreSQL server of .ci/postgres.sh from running into each other. Some
// of them stop and start the server (through AUTOTLS_TEST_POSTGRES_CTL),
// and `go test ./...` runs the test binaries of several packages at once:
// no test may use the server, in any process, while another stops it.
//
// A test that uses the server calls [Hold] (or its package's TestMain calls
// [Lock] for the whole run); one that stops it calls [Exclusive]. The hold
// is a shared flock on a file named after the server, one per process;
// Exclusive turns it into an exclusive one for the test's duration.
package pgtest

import (
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// URLEnv names the variable with the test server's URL.
const URLEnv = "AUTOTLS_TEST_POSTGRES_URL"

// The process's hold.
var (
	mu      sync.Mutex
	file    *os.File // open while holders > 0; nil without a server
	holders int
)

// Hold holds the server, shared with the tests of every process that do
// not stop it, until tb ends. Without a server URL it does nothing.
func Hold(tb testing.TB) {
	tb.Helper()
	release, err := Lock()
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	tb.Cleanup(release)
}

// Exclusive holds the server for tb alone until it ends, waiting until no
// other process holds it. The tests of this process must not use the
// server meanwhile (in a package whose tests run sequentially, none do).
func Exclusive(tb testing.TB) {
	tb.Helper()
	Hold(tb)
	mu.Lock()
	defer mu.Unlock()
	if file == nil {
		return
	}
	if err := flock(file, true); err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	tb.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		if err := flock(file, false); err != nil {
			tb.Errorf("pgtest: %v", err)
		}
	})
}

// Lock is [Hold] for TestMain: it returns the function that releases the
// hold.
func Lock() (release func(), err error) {
	mu.Lock()
	defer mu.Unlock()
	if holders == 0 {
		path := lockPath()
		if path == "" {
			return func() {}, nil
		}
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o666)
		if err != nil {
			return nil, err
		}
		if err := flock(f, false); err != nil {
			f.Close()
			return nil, err
		}
		file = f
	}
	holders++
	var once sync.Once
	return func() {
		once.Do(func() {
			mu.Lock()
			defer mu.Unlock()
			if holders--; holders == 0 {
				file.Close() // releases the flock
				file = nil
			}
		})
	}, nil
}

// lockPath is the lock file of the server at URLEnv, or "" if none.
func lockPath() string {
	u, err := url.Parse(os.Getenv(URLEnv))
	if err != nil || u.Host == "" {
		return ""
	}
	name := strings.NewReplacer(":", "-", "/", "-", "[", "", "]", "").Replace(u.Host)
	return filepath.Join(os.TempDir(), "autotls-postgres-"+name+".lock")
}
