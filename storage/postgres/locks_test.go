package postgres_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/p2ptls/autotls/internal/pgtest"
	"github.com/p2ptls/autotls/storage/postgres"
	"go.uber.org/goleak"
)

const (
	// lockName looks like the names certmagic locks.
	lockName = "issue_cert_*.k51qzi5uqu5d.libp2p.direct"

	// childEnv makes the test binary a lock holder (see TestMain), in the
	// schema it names.
	childEnv = "AUTOTLS_TEST_POSTGRES_LOCK_HOLDER_SCHEMA"
	// childLease is the lease of the holder process's locks.
	childLease = 3 * time.Second
)

func TestMain(m *testing.M) {
	if schema := os.Getenv(childEnv); schema != "" {
		os.Exit(holdLock(schema))
	}
	// Tests of other packages stop the server too (pgtest.Exclusive): hold
	// it, shared, while ours run.
	unlock, err := pgtest.Lock()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	unlock()
	os.Exit(code)
}

// holdLock is the lock holder process of TestHolderKilled: it takes the
// lock, prints its fencing token, and keeps the lock, its lease renewed,
// until it is killed or its standard input closes.
func holdLock(schema string) int {
	ctx := context.Background()
	s, err := postgres.New(ctx, os.Getenv(urlEnv), postgres.WithSchema(schema), postgres.WithLease(childLease))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer s.Close()
	if err := s.Lock(ctx, lockName); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fence, _ := s.Fence(lockName)
	fmt.Println(fence)
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// mustFence returns the fencing token of a lock that s holds.
func mustFence(t *testing.T, s *postgres.Storage) int64 {
	t.Helper()
	f, ok := s.Fence(lockName)
	if !ok {
		t.Fatalf("Fence(%q): not held", lockName)
	}
	return f
}

// TestHolderKilled: a lock whose holder process is killed (SIGKILL, no
// Unlock, no Close) stays held while the holder lives, its lease renewed
// past two lease lengths, and is taken over after its lease, with a
// greater fencing token.
func TestHolderKilled(t *testing.T) {
	t.Parallel()
	dbURL, schema := testURL(t), newSchema(t)
	const lease = childLease
	peer := open(t, dbURL, schema, postgres.WithLease(lease))

	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+schema)
	stdin, err := cmd.StdinPipe() // kept open: the holder waits on it
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("the holder did not report its fencing token: %v; its stderr: %s", err, stderr.Bytes())
	}
	childFence, err := strconv.ParseInt(strings.TrimSpace(line), 10, 64)
	if err != nil {
		t.Fatalf("the holder printed %q: %v", line, err)
	}

	// A live holder keeps the lock beyond its lease: a Lock waiting for
	// two lease lengths gives up.
	ctx, cancel := context.WithTimeout(t.Context(), 2*lease)
	err = peer.Lock(ctx, lockName)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock while the holder lives = %v, want the deadline to pass", err)
	}

	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	ctx, cancel = context.WithTimeout(t.Context(), 3*lease+10*time.Second)
	defer cancel()
	if err := peer.Lock(ctx, lockName); err != nil {
		t.Fatalf("Lock after the holder was killed: %v", err)
	}
	if f := mustFence(t, peer); f <= childFence {
		t.Errorf("fencing token after takeover = %d, want more than the dead holder's %d", f, childFence)
	}
	if err := peer.Unlock(t.Context(), lockName); err != nil {
		t.Fatal(err)
	}
}

// TestRenewerKeepsLease: in one process too, a held lock outlives several
// lease lengths while another pool waits for it, and passes to that pool
// on Unlock.
func TestRenewerKeepsLease(t *testing.T) {
	t.Parallel()
	dbURL, schema := testURL(t), newSchema(t)
	// Short, but long enough that a renewer delayed by a loaded machine
	// (it renews every lease/3) does not lose the lock.
	const lease = 2 * time.Second
	holder := open(t, dbURL, schema, postgres.WithLease(lease))
	waiter := open(t, dbURL, schema, postgres.WithLease(lease))
	if err := holder.Lock(t.Context(), lockName); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*lease)
	err := waiter.Lock(ctx, lockName)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock while held = %v, want the deadline to pass", err)
	}
	if err := holder.Unlock(t.Context(), lockName); err != nil {
		t.Fatalf("Unlock after 3 leases: %v", err)
	}
	ctx, cancel = context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := waiter.Lock(ctx, lockName); err != nil {
		t.Fatalf("Lock after Unlock: %v", err)
	}
	if err := waiter.Unlock(t.Context(), lockName); err != nil {
		t.Fatal(err)
	}
}

// TestFenceIncreases: each acquisition of a lock, by any pool, gets a
// greater fencing token than the one before; Fence reports only locks the
// storage holds.
func TestFenceIncreases(t *testing.T) {
	t.Parallel()
	dbURL, schema := testURL(t), newSchema(t)
	a, b := open(t, dbURL, schema), open(t, dbURL, schema)
	if _, ok := a.Fence(lockName); ok {
		t.Error("Fence of a lock never taken reports it held")
	}
	var last int64
	for i, s := range []*postgres.Storage{a, b, a, a, b} {
		if err := s.Lock(t.Context(), lockName); err != nil {
			t.Fatal(err)
		}
		f := mustFence(t, s)
		if f <= last {
			t.Errorf("acquisition %d: fencing token %d, want more than %d", i, f, last)
		}
		last = f
		if err := s.Unlock(t.Context(), lockName); err != nil {
			t.Fatal(err)
		}
		if _, ok := s.Fence(lockName); ok {
			t.Errorf("acquisition %d: Fence reports the lock held after Unlock", i)
		}
	}
}

// TestLockMisuse: Unlock and RenewLockLease of a lock this storage does not
// hold are errors, also when another storage holds it, and leave that
// holder's lock alone.
func TestLockMisuse(t *testing.T) {
	t.Parallel()
	dbURL, schema := testURL(t), newSchema(t)
	a, b := open(t, dbURL, schema), open(t, dbURL, schema)
	if err := a.Lock(t.Context(), lockName); err != nil {
		t.Fatal(err)
	}
	if err := b.Unlock(t.Context(), lockName); err == nil {
		t.Error("Unlock of a lock another storage holds succeeded")
	}
	if err := b.RenewLockLease(t.Context(), lockName, time.Minute); err == nil {
		t.Error("RenewLockLease of a lock another storage holds succeeded")
	}
	if ok, err := b.TryLock(t.Context(), lockName); ok || err != nil {
		t.Errorf("TryLock after the misuse = %v, %v; want false: the holder still has it", ok, err)
	}
	if err := a.Unlock(t.Context(), lockName); err != nil {
		t.Fatal(err)
	}
	if err := a.Unlock(t.Context(), lockName); err == nil {
		t.Error("second Unlock succeeded")
	}
}

// TestCloseStopsRenewers: Close stops the renewers of the locks still held
// (whose lease is long enough to keep them going for a minute otherwise);
// no goroutine of the storage or its pool outlives it. Close twice is
// fine, and calls after Close fail.
func TestCloseStopsRenewers(t *testing.T) {
	// Not parallel: goleak sees every goroutine of the process.
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	dbURL, schema := testURL(t), newSchema(t)
	// The default lease, 1 minute: a renewer that Close did not stop would
	// outlive the test.
	s, err := postgres.New(t.Context(), dbURL, postgres.WithSchema(schema))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := s.Lock(t.Context(), fmt.Sprint(lockName, i)); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	s.Close()
	if err := s.Lock(t.Context(), lockName); err == nil {
		t.Error("Lock after Close succeeded")
	}
	if _, err := s.Load(t.Context(), "k"); err == nil {
		t.Error("Load after Close succeeded")
	}
}
