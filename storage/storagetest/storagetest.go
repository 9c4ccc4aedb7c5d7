// Package storagetest is a conformance suite for any [certmagic.Storage]:
// call [Run] from a test with a function that makes an empty store.
//
//	func TestMyStorage(t *testing.T) {
//		storagetest.Run(t, func(t *testing.T) certmagic.Storage {
//			return newMyStorage(t) // empty; cleaned up with t.Cleanup
//		}, storagetest.Options{})
//	}
//
// It checks the contract that certmagic's documentation states and that
// [certmagic.FileStorage] keeps: '/'-separated keys where a directory is a
// key prefix, fs.ErrNotExist for missing keys, copy semantics, atomic
// writes, and locks that exclude, wait, honour cancellation and can be
// taken again; [certmagic.TryLocker] and [certmagic.LockLeaseRenewer] when
// the store implements them. [Options] declares what else the store can do:
// share its data with a second store (as another process would), and lose
// the locks of a holder that dies after a lease.
package storagetest

import (
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// Options declares what a store can do beyond the contract, and which
// checks to skip. The zero value runs the checks every store must pass.
type Options struct {
	// Shared, if set, returns a second store over the same data as s, the
	// way another process would see it: another connection pool to the same
	// database, another FileStorage on the same directory. The suite then
	// also checks that what one store writes the other reads, and that a
	// lock held through one excludes the other.
	Shared func(t *testing.T, s certmagic.Storage) certmagic.Storage

	// Abandon, if set (with Shared and Lease), makes s stop keeping the
	// locks it holds without unlocking them, as if its process had died:
	// closing its connection pool without Unlock, for instance. The suite
	// then checks that a shared store takes an abandoned lock over once
	// the lease has run out.
	Abandon func(t *testing.T, s certmagic.Storage)

	// Lease is how long an abandoned lock keeps excluding others, at most,
	// for the Abandon check; the store behind newStorage should use a short
	// one (a few seconds). The check waits up to 3×Lease + 10 s.
	Lease time.Duration

	// Skip names subtests to skip (see [Run] for their names), each with
	// the reason: a known gap of the store under test, reported by t.Skip.
	Skip map[string]string
}

// Run runs the conformance suite as subtests of t. newStorage must return
// a new, empty store each time it is called (once or twice per subtest),
// registering with t.Cleanup whatever it needs to undo.
//
// The subtests, each documented in this package's source: StoreLoad,
// CopySemantics, Missing, MissingBelowFile, Keys, List, Stat, Delete,
// ConcurrentWrites, Shared, LockExcludes, LockExcludesShared,
// LockContention, LockCancel, Relock, TryLock, RenewLockLease,
// AbandonedLock. Those that need an optional interface or an [Options]
// field skip without it.
//
// The subtests run in parallel with each other (t.Parallel), so Run
// returns before they finish; resources the caller shares between them
// must be released with t.Cleanup, not deferred.
//
// No check waits for something not to happen by sleeping: a lock is shown
// to exclude by a waiter that has not returned by the time the holder,
// having done some work of its own, unlocks, and that returns after.
// Locks that poll (certmagic.FileStorage waits a second between tries)
// make those checks take seconds.
func Run(t *testing.T, newStorage func(t *testing.T) certmagic.Storage, opts Options) {
	t.Helper()
	r := runner{newStorage: newStorage, opts: opts}
	for _, c := range []struct {
		name string
		test func(t *testing.T)
	}{
		{"StoreLoad", r.storeLoad},
		{"CopySemantics", r.copySemantics},
		{"Missing", r.missing},
		{"MissingBelowFile", r.missingBelowFile},
		{"Keys", r.keys},
		{"List", r.list},
		{"Stat", r.stat},
		{"Delete", r.delete},
		{"ConcurrentWrites", r.concurrentWrites},
		{"Shared", r.shared},
		{"LockExcludes", r.lockExcludes},
		{"LockExcludesShared", r.lockExcludesShared},
		{"LockContention", r.lockContention},
		{"LockCancel", r.lockCancel},
		{"Relock", r.relock},
		{"TryLock", r.tryLock},
		{"RenewLockLease", r.renewLockLease},
		{"AbandonedLock", r.abandonedLock},
	} {
		t.Run(c.name, func(t *testing.T) {
			if reason, ok := opts.Skip[c.name]; ok {
				t.Skip("known gap: " + reason)
			}
			t.Parallel()
			c.test(t)
		})
	}
}

// runner carries Run's arguments to the subtests.
type runner struct {
	newStorage func(t *testing.T) certmagic.Storage
	opts       Options
}
