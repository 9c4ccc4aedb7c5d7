package storagetest

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

const (
	// lockName looks like the names certmagic locks.
	lockName = "issue_cert_*.k51qzi5uqu5d.libp2p.direct"
	// lockWait bounds a Lock that must succeed once the lock is free.
	lockWait = 30 * time.Second
	// cancelWait bounds how long a Lock may take to return once its
	// context is cancelled.
	cancelWait = 10 * time.Second
)

// lockAsync calls s.Lock in a goroutine and delivers its result.
func lockAsync(ctx context.Context, s certmagic.Storage, name string) <-chan error {
	res := make(chan error, 1)
	go func() { res <- s.Lock(ctx, name) }()
	return res
}

// mustLock takes the named lock, failing the test if that takes longer than
// lockWait.
func mustLock(t *testing.T, s certmagic.Storage, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), lockWait)
	defer cancel()
	if err := s.Lock(ctx, name); err != nil {
		t.Fatalf("Lock(%q): %v", name, err)
	}
}

// mustUnlock releases the named lock.
func mustUnlock(t *testing.T, s certmagic.Storage, name string) {
	t.Helper()
	if err := s.Unlock(t.Context(), name); err != nil {
		t.Fatalf("Unlock(%q): %v", name, err)
	}
}

// busy does some work with the store, which gives a waiter for a lock time
// to try it, without sleeping.
func busy(t *testing.T, s certmagic.Storage) {
	t.Helper()
	for i := range 3 {
		key := fmt.Sprintf("busy/%d", i)
		fill(t, s, key)
		mustLoad(t, s, key, []byte(key))
	}
}

// excludes checks that while holder holds the lock, a Lock through waiter
// does not return, and that it returns once holder unlocks.
func excludes(t *testing.T, holder, waiter certmagic.Storage) {
	mustLock(t, holder, lockName)
	ctx, cancel := context.WithTimeout(t.Context(), lockWait)
	defer cancel()
	res := lockAsync(ctx, waiter, lockName)
	busy(t, holder)
	select {
	case err := <-res:
		t.Fatalf("second Lock returned (error %v) while the lock was held", err)
	default:
	}
	mustUnlock(t, holder, lockName)
	if err := <-res; err != nil {
		t.Fatalf("second Lock after Unlock: %v", err)
	}
	mustUnlock(t, waiter, lockName)
}

// lockExcludes: a second Lock of a held lock waits for its Unlock.
func (r runner) lockExcludes(t *testing.T) {
	s := r.newStorage(t)
	excludes(t, s, s)
}

// lockExcludesShared: so does a second Lock through a store over the same
// data, as in another process.
func (r runner) lockExcludesShared(t *testing.T) {
	if r.opts.Shared == nil {
		t.Skip("Options.Shared is not set")
	}
	a := r.newStorage(t)
	excludes(t, a, r.opts.Shared(t, a))
}

// lockContention: goroutines taking turns at one lock (through two stores
// over the same data, with Options.Shared) are never inside it together.
func (r runner) lockContention(t *testing.T) {
	stores := []certmagic.Storage{r.newStorage(t)}
	if r.opts.Shared != nil {
		stores = append(stores, r.opts.Shared(t, stores[0]))
	}
	const workers, rounds = 3, 2
	var inside atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, workers*rounds)
	for w := range workers {
		s := stores[w%len(stores)]
		wg.Go(func() {
			for i := range rounds {
				ctx, cancel := context.WithTimeout(t.Context(), lockWait)
				err := s.Lock(ctx, lockName)
				cancel()
				if err != nil {
					errs <- fmt.Errorf("locking: %w", err)
					return
				}
				if n := inside.Add(1); n != 1 {
					errs <- fmt.Errorf("%d holders inside the lock at once", n)
				}
				key := fmt.Sprintf("contention/%d/%d", w, i)
				if err := s.Store(t.Context(), key, []byte(key)); err != nil {
					errs <- err
				} else if _, err := s.Load(t.Context(), key); err != nil {
					errs <- err
				}
				inside.Add(-1)
				if err := s.Unlock(t.Context(), lockName); err != nil {
					errs <- fmt.Errorf("unlocking: %w", err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// lockCancel: a Lock waiting for a held lock returns an error soon after
// its context is cancelled, and leaves the lock to its holder; a Lock with
// a context already done fails too. The lock can be taken after.
func (r runner) lockCancel(t *testing.T) {
	s := r.newStorage(t)
	mustLock(t, s, lockName)

	ctx, cancel := context.WithCancel(t.Context())
	res := lockAsync(ctx, s, lockName)
	busy(t, s)
	select {
	case err := <-res:
		cancel()
		t.Fatalf("second Lock returned (error %v) while the lock was held", err)
	default:
	}
	cancel()
	timer := time.NewTimer(cancelWait)
	defer timer.Stop()
	select {
	case err := <-res:
		if err == nil {
			t.Fatal("second Lock returned nil after its context was cancelled, while the lock was held")
		}
	case <-timer.C:
		t.Fatalf("second Lock had not returned %v after its context was cancelled", cancelWait)
	}

	done, cancelDone := context.WithCancel(t.Context())
	cancelDone()
	select {
	case err := <-lockAsync(done, s, lockName):
		if err == nil {
			t.Fatal("Lock with a cancelled context returned nil while the lock was held")
		}
	case <-timer.C:
		t.Fatalf("Lock with a cancelled context had not returned after %v", cancelWait)
	}

	mustUnlock(t, s, lockName)
	mustLock(t, s, lockName)
	mustUnlock(t, s, lockName)
}

// relock: locks of different names are independent, and a lock can be
// taken again after Unlock, repeatedly.
func (r runner) relock(t *testing.T) {
	s := r.newStorage(t)
	mustLock(t, s, lockName)
	mustLock(t, s, lockName+".other")
	for range 3 {
		mustUnlock(t, s, lockName)
		mustLock(t, s, lockName)
	}
	mustUnlock(t, s, lockName)
	mustUnlock(t, s, lockName+".other")
}

// tryLock: for a certmagic.TryLocker, TryLock takes a free lock, reports
// false without error while it is held (through a shared store too), and
// succeeds again after Unlock.
func (r runner) tryLock(t *testing.T) {
	s := r.newStorage(t)
	tl, ok := s.(certmagic.TryLocker)
	if !ok {
		t.Skip("the store does not implement certmagic.TryLocker")
	}
	try := func(tl certmagic.TryLocker, want bool) {
		t.Helper()
		got, err := tl.TryLock(t.Context(), lockName)
		if err != nil || got != want {
			t.Fatalf("TryLock = %v, %v; want %v, nil", got, err, want)
		}
	}
	try(tl, true)
	try(tl, false)
	if r.opts.Shared != nil {
		if other, ok := r.opts.Shared(t, s).(certmagic.TryLocker); ok {
			try(other, false)
		}
	}
	mustUnlock(t, s, lockName)
	mustLock(t, s, lockName)
	try(tl, false)
	mustUnlock(t, s, lockName)
	try(tl, true)
	mustUnlock(t, s, lockName)
}

// renewLockLease: for a certmagic.LockLeaseRenewer, renewing the lease of a
// held lock succeeds and the lock still excludes; it unlocks as usual.
func (r runner) renewLockLease(t *testing.T) {
	s := r.newStorage(t)
	rl, ok := s.(certmagic.LockLeaseRenewer)
	if !ok {
		t.Skip("the store does not implement certmagic.LockLeaseRenewer")
	}
	mustLock(t, s, lockName)
	if err := rl.RenewLockLease(t.Context(), lockName, time.Minute); err != nil {
		t.Fatalf("RenewLockLease: %v", err)
	}
	waiter := s
	if r.opts.Shared != nil {
		waiter = r.opts.Shared(t, s)
	}
	if tl, ok := waiter.(certmagic.TryLocker); ok {
		if got, err := tl.TryLock(t.Context(), lockName); err != nil || got {
			t.Fatalf("TryLock after RenewLockLease = %v, %v; want false, nil", got, err)
		}
	}
	mustUnlock(t, s, lockName)
	mustLock(t, waiter, lockName)
	mustUnlock(t, waiter, lockName)
}

// abandonedLock: with Options.Abandon, a lock whose holder stopped keeping
// it is taken over through a shared store once the lease has run out.
func (r runner) abandonedLock(t *testing.T) {
	if r.opts.Shared == nil || r.opts.Abandon == nil || r.opts.Lease <= 0 {
		t.Skip("Options.Shared, Abandon and Lease are not all set")
	}
	a := r.newStorage(t)
	b := r.opts.Shared(t, a)
	mustLock(t, a, lockName)
	r.opts.Abandon(t, a)
	ctx, cancel := context.WithTimeout(t.Context(), 3*r.opts.Lease+10*time.Second)
	defer cancel()
	if err := b.Lock(ctx, lockName); err != nil {
		t.Fatalf("Lock of an abandoned lock: %v", err)
	}
	mustUnlock(t, b, lockName)
}
