package autotls

// Helpers of TestReliabilityDay: the checks of each kind of wait, the
// counters and hooks it reads the day with, and the CA gate.

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// waitFailures waits until l holds at least n failures, and returns them.
func waitFailures(t *testing.T, l *failureLog, n int) []EvtIssuanceFailed {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		l.mu.Lock()
		evs, more := slices.Clone(l.evs), l.more
		l.mu.Unlock()
		if len(evs) >= n {
			return evs
		}
		select {
		case <-more:
		case <-timeout:
			t.Fatalf("%d EvtIssuanceFailed within 30 s, want %d", len(evs), n)
		}
	}
}

// retryAfterWaits checks waits after failures that named their time: each
// is that long, at most 10 % more.
func retryAfterWaits(ra time.Duration) func(*testing.T, []time.Duration) {
	return func(t *testing.T, waits []time.Duration) {
		t.Helper()
		for i, w := range waits {
			if w < ra || w > ra+ra/10 {
				t.Errorf("wait %d = %v after a Retry-After of %v, want within [%v, %v]", i+1, w, ra, ra, ra+ra/10)
			}
		}
	}
}

// permanentWaits checks waits after refusals that need a change first:
// each about retryCap, never sooner than 90 % of it.
func permanentWaits(t *testing.T, waits []time.Duration) {
	t.Helper()
	for i, w := range waits {
		if w < retryCap*9/10 || w > retryCap {
			t.Errorf("wait %d = %v after a refusal, want within [%v, %v]", i+1, w, retryCap*9/10, retryCap)
		}
	}
}

// floorWaits checks waits after failures with a floor: the transient
// backoff, never below floor.
func floorWaits(floor time.Duration) func(*testing.T, []time.Duration) {
	return func(t *testing.T, waits []time.Duration) {
		t.Helper()
		d := retryBase
		for i, w := range waits {
			hi := max(d, floor)
			if d >= retryCap {
				hi = retryCap
			}
			if w < floor || w > hi {
				t.Errorf("wait %d = %v, want within [%v, %v]", i+1, w, floor, hi)
			}
			d *= 2
		}
	}
}

// fmtSimulated formats a simulated duration to the second.
func fmtSimulated(d time.Duration) string {
	return d.Round(time.Second).String()
}

// brokerCounter is the transport of the host's broker client: it counts
// the requests sent, answered or not (a refused connection never reaches
// the forge's counters), and, while timeout is set, gives each request
// that long (a hanging broker: the production timeouts are seconds of
// real time, which the fake clock does not see).
type brokerCounter struct {
	next    http.RoundTripper
	n       atomic.Int64
	timeout atomic.Int64 // nanoseconds; 0: none of its own
}

func (b *brokerCounter) RoundTrip(r *http.Request) (*http.Response, error) {
	b.n.Add(1)
	d := time.Duration(b.timeout.Load())
	if d == 0 {
		return b.next.RoundTrip(r)
	}
	ctx, cancel := context.WithTimeout(r.Context(), d)
	resp, err := b.next.RoundTrip(r.WithContext(ctx))
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = cancelOnClose{resp.Body, cancel}
	return resp, nil
}

// cancelOnClose cancels a request's context once its body is closed.
type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}

// serveTimes records the manager's clock each time it serves a
// certificate, from its "certificate loaded" line: the run goroutine logs
// it as it serves, before it waits again, whereas a test reading the clock
// after the certificate event could find it moved on to a later wait
// (the first renewal-information poll).
type serveTimes struct {
	clk  *fakeClock
	mu   sync.Mutex
	when []time.Time
}

// hook wraps the manager's logger; it is startRig's edit function.
func (s *serveTimes) hook(m *manager) {
	m.log = slog.New(serveHook{m.log.Handler(), s})
}

func (s *serveTimes) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.when)
}

// at returns the time of the n-th certificate served (from 0).
func (s *serveTimes) at(t *testing.T, n int) time.Time {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.when) <= n {
		t.Fatalf("%d certificates served, want more than %d", len(s.when), n)
	}
	return s.when[n]
}

type serveHook struct {
	slog.Handler
	s *serveTimes
}

func (h serveHook) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "certificate loaded" {
		h.s.mu.Lock()
		h.s.when = append(h.s.when, h.s.clk.Now())
		h.s.mu.Unlock()
	}
	return h.Handler.Handle(ctx, r)
}

func (h serveHook) WithAttrs(as []slog.Attr) slog.Handler {
	return serveHook{h.Handler.WithAttrs(as), h.s}
}

func (h serveHook) WithGroup(name string) slog.Handler {
	return serveHook{h.Handler.WithGroup(name), h.s}
}

// replaceDirWithFile puts a regular file where dir was, so that every
// read and write below it fails (ENOTDIR), for root too. It returns the
// repair. (breakDir in faults_storage_test.go uses it when run as root.)
func replaceDirWithFile(t *testing.T, dir string) (fix func()) {
	t.Helper()
	aside := dir + ".real"
	if err := os.Rename(dir, aside); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, dir, []byte("not a directory"))
	return func() {
		if err := os.Remove(dir); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(aside, dir); err != nil {
			t.Fatal(err)
		}
	}
}

// caGate is a TCP relay in front of the CA proxy. Shut, it accepts each
// connection and closes it at once, before the TLS handshake, counting
// it: the CA is unreachable and nothing reaches the proxy. Open, it
// relays both ways.
type caGate struct {
	ln      net.Listener
	target  string
	shut    atomic.Bool
	refused atomic.Int64

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// startCAGate puts a caGate in front of e's CA proxy and points the host
// at it.
func startCAGate(t *testing.T, e *dayEnv) {
	t.Helper()
	u, err := url.Parse(e.ca.URL)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &caGate{ln: ln, target: u.Host, conns: map[net.Conn]struct{}{}}
	u.Host = ln.Addr().String()
	e.caURL = u.String()
	e.gate = g
	e.closers = append(e.closers, g.close)
	g.wg.Add(1)
	go g.serve()
}

func (g *caGate) serve() {
	defer g.wg.Done()
	for {
		c, err := g.ln.Accept()
		if err != nil {
			return
		}
		if g.shut.Load() {
			g.refused.Add(1)
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", g.target)
		if err != nil {
			c.Close()
			continue
		}
		if !g.track(c, up) {
			return
		}
		g.wg.Add(2)
		go g.pipe(c, up)
		go g.pipe(up, c)
	}
}

// track remembers a relayed pair for close; false if closing.
func (g *caGate) track(cs ...net.Conn) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.conns == nil {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	for _, c := range cs {
		g.conns[c] = struct{}{}
	}
	return true
}

func (g *caGate) pipe(dst, src net.Conn) {
	defer g.wg.Done()
	_, _ = io.Copy(dst, src)
	dst.Close()
	src.Close()
}

// close stops the relay and waits for its goroutines.
func (g *caGate) close() {
	g.ln.Close()
	g.mu.Lock()
	for c := range g.conns {
		c.Close()
	}
	g.conns = nil
	g.mu.Unlock()
	g.wg.Wait()
}
