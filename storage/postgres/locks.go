package postgres

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// heldLock is a lock this storage holds, with its renewer.
type heldLock struct {
	name  string
	owner string
	fence int64

	// cancel stops the renewer; done is closed when it has returned.
	cancel context.CancelFunc
	done   chan struct{}

	// until is when the lease ends at the latest, on our clock: the time a
	// successful renewal was sent plus the lease it asked for. Guarded by
	// Storage.mu.
	until time.Time
	// lost is set when the renewer finds the lease ended. Guarded by
	// Storage.mu.
	lost bool
}

// Lock takes the named lock, waiting until it is free or its lease has
// ended, or until ctx is done. The lock stays held, its lease renewed in
// the background, until Unlock or Close.
func (s *Storage) Lock(ctx context.Context, name string) error {
	owner := newOwner()
	wait := 25 * time.Millisecond
	for {
		ok, err := s.acquire(ctx, name, owner)
		if err != nil {
			return fmt.Errorf("postgres: locking %q: %w", name, err)
		}
		if ok {
			return nil
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("postgres: waiting for lock %q: %w", name, ctx.Err())
		case <-t.C:
		}
		wait = min(wait*3/2, time.Second)
	}
}

// TryLock takes the named lock if it is free or its lease has ended, and
// reports whether it did, without waiting.
func (s *Storage) TryLock(ctx context.Context, name string) (bool, error) {
	ok, err := s.acquire(ctx, name, newOwner())
	if err != nil {
		return false, fmt.Errorf("postgres: trying lock %q: %w", name, err)
	}
	return ok, nil
}

// acquire makes one attempt to take the lock for owner and, if it does,
// starts renewing it.
func (s *Storage) acquire(ctx context.Context, name, owner string) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	cctx, cancel := s.callCtx(ctx)
	defer cancel()
	sent := time.Now()
	var fence int64
	err := s.pool.QueryRow(cctx, s.q.acquire, name, owner, s.lease.Milliseconds()).Scan(&fence)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		if !pgconn.SafeToRetry(err) {
			// The statement may have taken the lock before the call
			// gave up (cancelled, timed out, connection lost): give it
			// back rather than leave it held until its lease ends.
			s.releaseLater(name, owner, sent.Add(s.lease))
		}
		return false, err
	}

	h := &heldLock{name: name, owner: owner, fence: fence, done: make(chan struct{}), until: sent.Add(s.lease)}
	var rctx context.Context
	rctx, h.cancel = context.WithCancel(s.ctx)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		h.cancel()
		_, _ = s.pool.Exec(cctx, s.q.unlock, name, owner) // best effort
		return false, errors.New("storage closed")
	}
	// A lock of ours under the same name can only be one whose lease
	// ended unnoticed: it is not ours any more.
	old := s.held[name]
	s.held[name] = h
	s.wg.Add(1)
	s.mu.Unlock()
	if old != nil {
		old.cancel()
	}
	go s.renew(rctx, h)
	return true, nil
}

// releaseLater deletes, in the background, the row of a lock that owner
// may hold, retrying every second while the database cannot be reached,
// until the lease would have ended anyway (until) or Close.
func (s *Storage) releaseLater(name, owner string, until time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.wg.Go(func() {
		for {
			ctx, cancel := s.callCtx(s.ctx)
			_, err := s.pool.Exec(ctx, s.q.unlock, name, owner)
			cancel()
			left := time.Until(until)
			if err == nil || left <= 0 {
				return
			}
			t := time.NewTimer(min(time.Second, left))
			select {
			case <-s.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	})
}

// Unlock releases the named lock: it stops renewing it and deletes its row
// if the row is still ours. It returns an error if this storage does not
// hold the lock, if the lock's lease had ended and another holder may have
// taken it, or if the database could not be reached (then the lock is free
// when its lease ends).
func (s *Storage) Unlock(ctx context.Context, name string) error {
	s.mu.Lock()
	h := s.held[name]
	delete(s.held, name)
	s.mu.Unlock()
	if h == nil {
		return fmt.Errorf("postgres: unlocking %q: not held by this storage", name)
	}
	h.cancel()
	<-h.done
	ctx, cancel := s.callCtx(ctx)
	defer cancel()
	tag, err := s.pool.Exec(ctx, s.q.unlock, name, h.owner)
	if err != nil {
		return fmt.Errorf("postgres: unlocking %q: %w", name, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("postgres: unlocking %q: the lock's lease had ended; another holder may have taken it", name)
	}
	return nil
}

// RenewLockLease extends the lease of the named lock, which this storage
// holds, to at least leaseDuration from now. The lock's renewer keeps
// renewing it afterwards as usual, never shortening the lease.
func (s *Storage) RenewLockLease(ctx context.Context, lockKey string, leaseDuration time.Duration) error {
	s.mu.Lock()
	h := s.held[lockKey]
	s.mu.Unlock()
	if h == nil {
		return fmt.Errorf("postgres: renewing the lease of lock %q: not held by this storage", lockKey)
	}
	if err := s.extend(ctx, h, leaseDuration); err != nil {
		return fmt.Errorf("postgres: renewing the lease of lock %q: %w", lockKey, err)
	}
	return nil
}

// errLost reports that a lock's row is gone or has another owner.
var errLost = errors.New("the lock's lease had ended; another holder may have taken it")

// extend renews h's lease to at least d from now.
func (s *Storage) extend(ctx context.Context, h *heldLock, d time.Duration) error {
	ctx, cancel := s.callCtx(ctx)
	defer cancel()
	sent := time.Now()
	tag, err := s.pool.Exec(ctx, s.q.renew, h.name, h.owner, d.Milliseconds())
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return errLost
	}
	s.mu.Lock()
	if u := sent.Add(d); u.After(h.until) {
		h.until = u
	}
	s.mu.Unlock()
	return nil
}

// Fence returns the fencing token of the named lock if this storage holds
// it (false once its renewer found the lease ended). Tokens increase with every acquisition of any lock in the database:
// a resource that remembers the greatest token it has seen can refuse a
// write carrying a smaller one, from a holder whose lease ended.
func (s *Storage) Fence(name string) (int64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h, ok := s.held[name]
	if !ok || h.lost {
		return 0, false
	}
	return h.fence, true
}

// renew renews h's lease every third of the lease until ctx is done (Unlock,
// Close, or a newer acquisition of the same name). When renewal fails it
// logs one warning and retries, at most every second, until the lease has
// run out.
func (s *Storage) renew(ctx context.Context, h *heldLock) {
	defer s.wg.Done()
	defer close(h.done)
	interval := s.lease / 3
	retry := min(interval, time.Second)
	log := s.log.With("lock", h.name)
	var failing bool
	t := time.NewTimer(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.mu.Lock()
		until := h.until
		s.mu.Unlock()
		// An attempt that outlasts the lease is of no use.
		actx, cancel := context.WithDeadline(ctx, until)
		err := s.extend(actx, h, s.lease)
		cancel()
		if ctx.Err() != nil {
			return
		}
		switch {
		case err == nil:
			if failing {
				log.Info("postgres: renewing the lock's lease again")
				failing = false
			}
			t.Reset(interval)
			continue
		case errors.Is(err, errLost):
			s.lose(h)
			log.Error("postgres: lost the lock: its lease had ended and another holder may have taken it")
			return
		}
		left := time.Until(until)
		if left <= 0 {
			s.lose(h)
			log.Error("postgres: the lock's lease ended while renewal was failing; another holder may take it", "err", err)
			return
		}
		if !failing {
			log.Warn("postgres: renewing the lock's lease failed; retrying until it ends", "err", err, "lease_left", left.Round(time.Millisecond))
			failing = true
		} else {
			log.Debug("postgres: renewing the lock's lease failed again", "err", err)
		}
		t.Reset(min(retry, left))
	}
}

// lose marks h as no longer held: Fence stops reporting it.
func (s *Storage) lose(h *heldLock) {
	s.mu.Lock()
	h.lost = true
	s.mu.Unlock()
}

// newOwner returns a random owner token.
func newOwner() string {
	return rand.Text()
}
