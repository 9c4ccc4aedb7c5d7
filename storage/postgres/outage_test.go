package postgres_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/p2ptls/autotls/internal/pgtest"
	"github.com/p2ptls/autotls/storage/postgres"
)

// proxy forwards TCP connections to the database and can cut them, as a
// network partition would.
type proxy struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu     sync.Mutex
	cut    bool // nothing is forwarded
	muted  bool // only replies are dropped
	closed bool
	// client maps each client connection to its server connection, nil
	// while the connection is silent (cut).
	client map[net.Conn]net.Conn
}

// startProxy starts a proxy on loopback to the database of dbURL and
// returns it with the URL that goes through it. It stops at cleanup.
func startProxy(t *testing.T, dbURL string) (*proxy, string) {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: u.Host, client: make(map[net.Conn]net.Conn)}
	p.wg.Go(p.serve)
	t.Cleanup(p.close)
	return p, withHost(t, dbURL, ln.Addr().String())
}

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			return
		}
		p.client[c] = nil
		cut := p.cut
		p.mu.Unlock()
		if !cut { // else the connection stays open and silent
			p.wg.Go(func() { p.forward(c) })
		}
	}
}

// forward copies between c and a new connection to the database until
// either side closes, or the proxy cuts it: then c stays open, silent.
func (p *proxy) forward(c net.Conn) {
	d, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	if p.cut || p.closed {
		p.mu.Unlock()
		d.Close()
		return
	}
	p.client[c] = d
	p.mu.Unlock()
	go func() { _, _ = io.Copy(d, c) }() // returns once c or d is closed
	buf := make([]byte, 32<<10)
	for {
		n, err := d.Read(buf)
		p.mu.Lock()
		muted := p.muted
		p.mu.Unlock()
		if n > 0 && !muted {
			if _, err := c.Write(buf[:n]); err != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	d.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.cut && !p.muted {
		c.Close()
		delete(p.client, c)
	}
}

// Cut partitions the network: every open connection goes silent, and new
// ones are accepted but never answered.
func (p *proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = true
	for c, d := range p.client {
		if d != nil {
			d.Close()
			p.client[c] = nil
		}
	}
}

// Mute drops what the database sends: requests still reach it, and it
// carries them out, but no reply comes back, on open connections or new
// ones.
func (p *proxy) Mute() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.muted = true
}

// Restore ends a partition or a mute: the connections that lived through
// it are reset, and new ones are forwarded again.
func (p *proxy) Restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut, p.muted = false, false
	for c, d := range p.client {
		c.Close()
		if d != nil {
			d.Close()
		}
		delete(p.client, c)
	}
}

func (p *proxy) close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for c, d := range p.client {
		c.Close()
		if d != nil {
			d.Close()
		}
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// logRecorder is a slog handler that keeps the records it handles, for a
// test to wait on, and passes them on to the test's output.
type logRecorder struct {
	*recorded
	out slog.Handler
}

type recorded struct {
	mu      sync.Mutex
	records []slog.Record
	changed chan struct{} // closed and replaced at each record
}

func newLogRecorder(t *testing.T) (*logRecorder, *slog.Logger) {
	h := &logRecorder{&recorded{changed: make(chan struct{})}, testLogger(t).Handler()}
	return h, slog.New(h)
}

func (h *logRecorder) Enabled(context.Context, slog.Level) bool { return true }

func (h *logRecorder) Handle(ctx context.Context, r slog.Record) error {
	h.mu.Lock()
	h.records = append(h.records, r.Clone())
	close(h.changed)
	h.changed = make(chan struct{})
	h.mu.Unlock()
	return h.out.Handle(ctx, r)
}

func (h *logRecorder) WithAttrs(as []slog.Attr) slog.Handler {
	return &logRecorder{h.recorded, h.out.WithAttrs(as)}
}

func (h *logRecorder) WithGroup(name string) slog.Handler {
	return &logRecorder{h.recorded, h.out.WithGroup(name)}
}

// count returns how many records of the level have msg in their message,
// and a channel closed at the next record.
func (h *logRecorder) count(level slog.Level, msg string) (int, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, r := range h.records {
		if r.Level == level && strings.Contains(r.Message, msg) {
			n++
		}
	}
	return n, h.changed
}

// wait waits until n records of the level have msg in their message.
func (h *logRecorder) wait(t *testing.T, n int, level slog.Level, msg string, timeout time.Duration) {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		got, changed := h.count(level, msg)
		if got >= n {
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			t.Fatalf("no %d×%v %q logged within %v (%d so far)", n, level, msg, timeout, got)
		}
	}
}

// within runs f and returns its error, failing the test if f has not
// returned after d: it hangs.
func within(t *testing.T, d time.Duration, f func() error) error {
	t.Helper()
	res := make(chan error, 1)
	go func() { res <- f() }()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case err := <-res:
		return err
	case <-timer.C:
		t.Fatalf("call still running after %v: it hangs", d)
		return nil
	}
}

// TestOutage: while the network to the database is cut, every call
// returns an error within the timeout, wrapping the cause; once it is
// back, every call works again and the data and the lock held are intact.
func TestOutage(t *testing.T) {
	t.Parallel()
	dbURL, schema := testURL(t), newSchema(t)
	p, proxied := startProxy(t, dbURL)
	const timeout = 500 * time.Millisecond
	s := open(t, proxied, schema, postgres.WithTimeout(timeout))
	ctx := t.Context()
	if err := s.Store(ctx, "certs/a", []byte("a")); err != nil {
		t.Fatal(err)
	}
	if err := s.Lock(ctx, "held"); err != nil {
		t.Fatal(err)
	}

	p.Cut()
	for _, c := range []struct {
		name string
		call func() error
	}{
		{"Load", func() error { _, err := s.Load(ctx, "certs/a"); return err }},
		{"Store", func() error { return s.Store(ctx, "certs/b", []byte("b")) }},
		{"Stat", func() error { _, err := s.Stat(ctx, "certs/a"); return err }},
		{"List", func() error { _, err := s.List(ctx, "certs", true); return err }},
		{"Delete", func() error { return s.Delete(ctx, "certs/a") }},
		{"Lock", func() error { return s.Lock(ctx, "other") }},
		{"TryLock", func() error { _, err := s.TryLock(ctx, "other"); return err }},
		{"RenewLockLease", func() error { return s.RenewLockLease(ctx, "held", time.Minute) }},
		{"Exists", func() error {
			if s.Exists(ctx, "certs/a") {
				return nil
			}
			return errors.New("false")
		}},
	} {
		err := within(t, timeout+10*time.Second, c.call)
		if err == nil {
			t.Errorf("%s during the outage succeeded", c.name)
		} else if c.name != "Exists" && !strings.HasPrefix(err.Error(), "postgres: ") {
			t.Errorf("%s during the outage: %v, want an error saying what failed", c.name, err)
		}
	}

	p.Restore()
	if v, err := s.Load(ctx, "certs/a"); err != nil || string(v) != "a" {
		t.Errorf("Load after the outage = %q, %v", v, err)
	}
	if !s.Exists(ctx, "certs/a") {
		t.Error("Exists after the outage = false")
	}
	if err := s.Unlock(ctx, "held"); err != nil {
		t.Errorf("Unlock after the outage: %v", err)
	}
}

// TestRenewalOutage: an outage shorter than the lease costs a held lock
// nothing: the renewer logs one warning however often it fails, retries,
// says when renewal works again, and the lock stays held throughout.
func TestRenewalOutage(t *testing.T) {
	t.Parallel()
	dbURL, schema := testURL(t), newSchema(t)
	p, proxied := startProxy(t, dbURL)
	logs, logger := newLogRecorder(t)
	// Renewals every 3 s, retried every second: the outage below lasts
	// about 2 s past the first failed renewal, well within the lease.
	const lease = 9 * time.Second
	s := open(t, proxied, schema, postgres.WithLease(lease), postgres.WithTimeout(500*time.Millisecond), postgres.WithLogger(logger))
	other := open(t, dbURL, schema)
	if err := s.Lock(t.Context(), lockName); err != nil {
		t.Fatal(err)
	}
	p.Cut()
	logs.wait(t, 1, slog.LevelWarn, "renewing the lock's lease failed", 2*lease)
	logs.wait(t, 1, slog.LevelDebug, "failed again", 2*lease)
	p.Restore()
	logs.wait(t, 1, slog.LevelInfo, "renewing the lock's lease again", 2*lease)
	if n, _ := logs.count(slog.LevelWarn, ""); n != 1 {
		t.Errorf("%d warnings logged for one outage, want 1", n)
	}
	if n, _ := logs.count(slog.LevelError, ""); n != 0 {
		t.Errorf("%d errors logged for an outage shorter than the lease, want 0", n)
	}
	if ok, err := other.TryLock(t.Context(), lockName); ok || err != nil {
		t.Fatalf("TryLock from another pool after the outage = %v, %v; want false: the lock is still held", ok, err)
	}
	if err := s.Unlock(t.Context(), lockName); err != nil {
		t.Fatalf("Unlock after the outage: %v", err)
	}
}

// TestLeaseEndsInOutage: an outage longer than the lease loses the lock:
// the renewer gives up with an error line, another pool takes the lock
// with a greater fencing token, and the first holder's Unlock, once the
// database is back, fails without releasing the new holder's lock.
func TestLeaseEndsInOutage(t *testing.T) {
	t.Parallel()
	dbURL, schema := testURL(t), newSchema(t)
	p, proxied := startProxy(t, dbURL)
	logs, logger := newLogRecorder(t)
	const lease = 2 * time.Second
	s := open(t, proxied, schema, postgres.WithLease(lease), postgres.WithTimeout(300*time.Millisecond), postgres.WithLogger(logger))
	next := open(t, dbURL, schema, postgres.WithLease(lease))
	third := open(t, dbURL, schema)
	if err := s.Lock(t.Context(), lockName); err != nil {
		t.Fatal(err)
	}
	lost := mustFence(t, s)

	p.Cut()
	logs.wait(t, 1, slog.LevelError, "lease ended while renewal was failing", 5*lease)
	if _, ok := s.Fence(lockName); ok {
		t.Error("Fence reports a lock whose lease ended as held")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*lease+10*time.Second)
	defer cancel()
	if err := next.Lock(ctx, lockName); err != nil {
		t.Fatalf("Lock after the holder's lease ended: %v", err)
	}
	if f := mustFence(t, next); f <= lost {
		t.Errorf("fencing token of the new holder = %d, want more than %d", f, lost)
	}

	p.Restore()
	if err := s.Unlock(t.Context(), lockName); err == nil {
		t.Error("Unlock by the holder whose lease ended succeeded")
	}
	if ok, err := third.TryLock(t.Context(), lockName); ok || err != nil {
		t.Fatalf("TryLock after the old holder's Unlock = %v, %v; want false: the new holder has it", ok, err)
	}
	if err := next.Unlock(t.Context(), lockName); err != nil {
		t.Fatal(err)
	}
}

// TestLockReplyLost: a Lock whose statement took the lock but whose reply
// never came (timed out) gives the lock back once the database answers
// again, rather than leave it taken for a lease nobody renews.
func TestLockReplyLost(t *testing.T) {
	t.Parallel()
	dbURL, schema := testURL(t), newSchema(t)
	p, proxied := startProxy(t, dbURL)
	// The default lease, 1 minute: the other pool gets the lock long before.
	s := open(t, proxied, schema, postgres.WithTimeout(500*time.Millisecond))
	other := open(t, dbURL, schema)
	if err := s.Store(t.Context(), "k", nil); err != nil { // a connection to take the lock on
		t.Fatal(err)
	}
	p.Mute()
	if err := s.Lock(t.Context(), lockName); err == nil {
		t.Fatal("Lock without a reply succeeded")
	}
	if ok, err := other.TryLock(t.Context(), lockName); ok || err != nil {
		t.Fatalf("TryLock while the reply is lost = %v, %v; want false: the statement took the lock", ok, err)
	}
	p.Restore()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := other.Lock(ctx, lockName); err != nil {
		t.Fatalf("Lock of the lock given back: %v", err)
	}
	if err := other.Unlock(t.Context(), lockName); err != nil {
		t.Fatal(err)
	}
}

// TestUnreachable: New fails within its timeout, not later, for a closed
// port and for a server that accepts connections and never answers.
func TestUnreachable(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()

	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	var accepted []net.Conn
	defer func() {
		for _, c := range accepted {
			c.Close()
		}
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			accepted = append(accepted, c)
		}
	}()
	defer func() { silent.Close(); <-done }()

	const timeout = 500 * time.Millisecond
	for name, addr := range map[string]string{"closed port": closed, "silent server": silent.Addr().String()} {
		dbURL := "postgres://autotls@" + addr + "/autotls?sslmode=disable"
		err := within(t, timeout+10*time.Second, func() error {
			s, err := postgres.New(t.Context(), dbURL, postgres.WithTimeout(timeout))
			if err == nil {
				s.Close()
			}
			return err
		})
		if err == nil {
			t.Errorf("%s: New succeeded", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

// TestServerRestart: with AUTOTLS_TEST_POSTGRES_CTL (set by
// .ci/postgres.sh), the server is stopped and started again while a lock
// is held: Load fails while it is down, and afterwards works, and the lock
// is still held and unlocks. Not parallel: the other tests share the
// server.
func TestServerRestart(t *testing.T) {
	dbURL, schema := testURL(t), newSchema(t)
	ctl := os.Getenv("AUTOTLS_TEST_POSTGRES_CTL")
	if ctl == "" {
		t.Skip("AUTOTLS_TEST_POSTGRES_CTL is not set: run with `bash .ci/postgres.sh go test ./storage/postgres/` to restart the server")
	}
	pgtest.Exclusive(t) // no other package's test uses the server meanwhile
	run := func(arg string) {
		t.Helper()
		if out, err := exec.CommandContext(t.Context(), ctl, arg).CombinedOutput(); err != nil {
			t.Fatalf("%s %s: %v\n%s", ctl, arg, err, out)
		}
	}
	const timeout = time.Second
	s := open(t, dbURL, schema, postgres.WithLease(30*time.Second), postgres.WithTimeout(timeout))
	ctx := t.Context()
	if err := s.Store(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if err := s.Lock(ctx, lockName); err != nil {
		t.Fatal(err)
	}

	run("stop")
	restarted := false
	defer func() {
		if !restarted {
			run("start")
		}
	}()
	err := within(t, timeout+10*time.Second, func() error { _, err := s.Load(ctx, "k"); return err })
	if err == nil {
		t.Error("Load with the server stopped succeeded")
	}
	run("start")
	restarted = true

	if v, err := s.Load(ctx, "k"); err != nil || string(v) != "v" {
		t.Errorf("Load after the restart = %q, %v", v, err)
	}
	other := open(t, dbURL, schema)
	if ok, err := other.TryLock(ctx, lockName); ok || err != nil {
		t.Errorf("TryLock after the restart = %v, %v; want false: the lock is still held", ok, err)
	}
	if err := s.Unlock(ctx, lockName); err != nil {
		t.Errorf("Unlock after the restart: %v", err)
	}
}
