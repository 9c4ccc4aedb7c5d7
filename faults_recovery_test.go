package autotls

// Fault tests of recovery: a damaged lock file in the way of the first
// issuance, and a certificate that lapsed while the CA was down.

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestFaultLockDamaged: the lock file of the certificate, left damaged
// before the host starts, never keeps the host from its certificate. A
// torn write, a date in the future and an empty directory are repaired by
// storage.Dir's Lock with one warning naming the file, and the host gets
// its certificate with no failed attempt and no wait on its clock beyond
// an issuance's own polls (a lock that waited for the date, or a garbage
// file judged held, would time out into a failed attempt). A directory
// with something in it is not the store's to remove: the attempt fails at
// once with a storage failure that names it and says to remove it, and
// the next retry after the operator removed it issues.
func TestFaultLockDamaged(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name string
		// damage replaces the lock file at path.
		damage func(t *testing.T, path string)
		// stuck: the first attempt fails until the test removes path.
		stuck bool
		want  string // in the one warning
	}{
		{
			name: "torn write",
			damage: func(t *testing.T, path string) {
				mustWrite(t, path, []byte(`{"created":"2026-`))
			},
			want: "lock file held garbage",
		},
		{
			name: "dated tomorrow",
			damage: func(t *testing.T, path string) {
				tomorrow := time.Now().Add(24 * time.Hour).Format(time.RFC3339Nano)
				mustWrite(t, path, []byte(`{"created":"`+tomorrow+`","updated":"`+tomorrow+`"}`))
			},
			want: "lock file was dated in the future",
		},
		{
			name: "empty directory",
			damage: func(t *testing.T, path string) {
				if err := os.Mkdir(path, 0o700); err != nil {
					t.Fatal(err)
				}
			},
			want: "lock file was an empty directory",
		},
		{
			name: "directory not empty",
			damage: func(t *testing.T, path string) {
				if err := os.Mkdir(path, 0o700); err != nil {
					t.Fatal(err)
				}
				mustWrite(t, filepath.Join(path, "notes"), []byte("someone's"))
			},
			stuck: true,
			want:  "remove it",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			key := genKey(t, crypto.Ed25519)
			dir := filepath.Join(t.TempDir(), "store")
			lock := writeLock(t, dir, f, idOf(t, key), time.Now())
			if err := os.Remove(lock); err != nil {
				t.Fatal(err)
			}
			tc.damage(t, lock)

			// The store's own warnings, apart from the manager's.
			storeLogs := &logCapture{}
			st, err := storage.Dir(dir, storage.WithLogger(storeLogs.logger()))
			if err != nil {
				t.Fatal(err)
			}
			clk := newClockAtNow()
			if tc.stuck {
				clk.SetHorizon(clk.Now()) // park at the first retry
			} else {
				clk.SetHorizon(clk.Now().Add(time.Minute))
			}
			r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st))

			if tc.stuck {
				clk.WaitParked(t, 30*time.Second)
				if r.m.cert.Load() != nil {
					t.Fatal("a certificate was issued without the lock")
				}
				ev := r.fails.last(t)
				var se *storageError
				if !errors.As(ev.Err, &se) {
					t.Errorf("the failure %v is not a storage failure", ev.Err)
				}
				w := warnings(r)
				if len(w) != 1 || !strings.Contains(w[0].text, lock) || !strings.Contains(w[0].text, tc.want) {
					t.Fatalf("want one warning naming %s and saying to %q:\n%s", lock, tc.want, r.logs)
				}
				t.Logf("the operator reads: %s", w[0].text)
				pingOverTCP(t, f, r.h)
				if err := os.RemoveAll(lock); err != nil {
					t.Fatal(err)
				}
				clk.SetHorizon(clk.Now().Add(time.Minute))
			}
			c := r.waitLoaded(t)
			if _, err := os.Stat(lock); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the lock file is still there after issuance: %v", err)
			}

			fails := r.fails.all()
			if tc.stuck {
				if len(fails) != 1 {
					t.Errorf("%d failed attempts, want 1: the retry after the fix must issue", len(fails))
				}
				checkBackoff(t, r.retries())
				if w := warnings(r); len(w) != 1 {
					t.Errorf("%d warnings from the host, want the 1 about the lock:\n%s", len(w), r.logs)
				}
				if w := storeLogs.atLeast(slog.LevelWarn); len(w) != 0 {
					t.Errorf("storage warnings for a lock it must not repair:\n%s", storeLogs)
				}
			} else {
				if len(fails) != 0 || len(r.retries()) != 0 {
					t.Errorf("failed attempts %v, retries %v: the damaged lock was not repaired at once", fails, r.retries())
				}
				// The only long wait is the one the clock is parked in,
				// until the first ARI poll; every other is a poll inside
				// the issuance.
				clk.WaitParked(t, 30*time.Second)
				waits := clk.Waits()
				for i, d := range waits[:len(waits)-1] {
					if d > pollMax {
						t.Errorf("wait %d of %v before the certificate is %v, longer than any poll of an issuance", i+1, waits, d)
					}
				}
				if w := warnings(r); len(w) != 0 {
					t.Errorf("warnings from the host for a lock the store repaired:\n%s", r.logs)
				}
				w := storeLogs.atLeast(slog.LevelWarn)
				if len(w) != 1 || !strings.Contains(w[0].text, lock) || !strings.Contains(w[0].text, tc.want) {
					t.Fatalf("want one storage warning naming %s (%q):\n%s", lock, tc.want, storeLogs)
				}
				t.Logf("the operator reads: %s", w[0].text)
			}
			if servedSerial(t, r) != c.leaf.SerialNumber.String() {
				t.Error("the WSS listener does not serve the certificate")
			}
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
	}
}
