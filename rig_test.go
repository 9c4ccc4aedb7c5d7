package autotls

// The rig of the fault tests: one host under test on the fake clock,
// logging into a capture, and the helpers that look at it.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	"github.com/mholt/acmez/v3/acme"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
	"go.uber.org/fx"
	"go.uber.org/goleak"
)

// logCapture keeps every record logged through its logger, formatted as
// text, so that a test can read what an operator would.
type logCapture struct {
	mu    sync.Mutex
	out   bytes.Buffer // the record being formatted
	lines []logLine
}

type logLine struct {
	level slog.Level
	msg   string
	text  string                // the whole line, attributes included
	attrs map[string]slog.Value // the record's own attributes
}

func (c *logCapture) logger() *slog.Logger {
	return slog.New(captureHandler{c, slog.NewTextHandler(&c.out, &slog.HandlerOptions{Level: slog.LevelDebug})})
}

// all returns every line logged so far.
func (c *logCapture) all() []logLine {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]logLine(nil), c.lines...)
}

// atLeast returns the lines logged at level or above.
func (c *logCapture) atLeast(level slog.Level) []logLine {
	var out []logLine
	for _, l := range c.all() {
		if l.level >= level {
			out = append(out, l)
		}
	}
	return out
}
func (c *logCapture) String() string {
	var b strings.Builder
	for _, l := range c.all() {
		b.WriteString(l.text)
	}
	return b.String()
}

type captureHandler struct {
	c *logCapture
	h slog.Handler
}

func (captureHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h captureHandler) Handle(ctx context.Context, r slog.Record) error {
	h.c.mu.Lock()
	defer h.c.mu.Unlock()
	h.c.out.Reset()
	err := h.h.Handle(ctx, r)
	attrs := map[string]slog.Value{}
	r.Attrs(func(a slog.Attr) bool {
		attrs[a.Key] = a.Value.Resolve()
		return true
	})
	h.c.lines = append(h.c.lines, logLine{level: r.Level, msg: r.Message, text: h.c.out.String(), attrs: attrs})
	return err
}
func (h captureHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return captureHandler{h.c, h.h.WithAttrs(as)}
}
func (h captureHandler) WithGroup(name string) slog.Handler {
	return captureHandler{h.c, h.h.WithGroup(name)}
}

// faultRig is one host under test with what the fault tests look at.
type faultRig struct {
	f     *testforge.Forge
	h     host.Host
	m     *manager
	clk   *fakeClock
	logs  *logCapture
	fails *failureLog
	// closers run after the host is closed, before the leak check (idle
	// connections of HTTP clients the test gave the host).
	closers []func()
}

// startRig builds a loopback host with autotls pointed at f, on the fake
// clock clk, logging into a capture. edit, if not nil, adjusts the
// manager before it starts (retry bounds, TXT wait).
func startRig(t *testing.T, f *testforge.Forge, clk *fakeClock, libp2pOpts []libp2p.Option, edit func(*manager), opts ...Opt) *faultRig {
	t.Helper()
	r := &faultRig{f: f, clk: clk, logs: &logCapture{}, fails: &failureLog{}}
	libp2pOpts = append(slices.Clone(libp2pOpts), r.fails.option(t))
	r.closers = append(r.closers, func() { r.fails.stop() })
	opts = append([]Opt{
		WithLogger(r.logs.logger()),
		withClock(clk),
		withManager(func(m *manager) {
			r.m = m
			if edit != nil {
				edit(m)
			}
		}),
	}, opts...)
	r.h = newHost(t, f, libp2pOpts, opts...)
	return r
}

// failureLog records every EvtIssuanceFailed of a host from its start: the
// event is not stateful, so a subscriber made after libp2p.New could miss
// the first ones.
type failureLog struct{ eventLog[EvtIssuanceFailed] }

// eventLog records every event of type T on a host's bus from its start.
type eventLog[T any] struct {
	mu   sync.Mutex
	evs  []T
	more chan struct{}
	stop func()
}

func (l *eventLog[T]) option(t testing.TB) libp2p.Option {
	l.more = make(chan struct{})
	l.stop = func() {}
	return libp2p.WithFxOption(fx.Invoke(func(h host.Host) error {
		sub, err := h.EventBus().Subscribe(new(T), eventbus.BufSize(256))
		if err != nil {
			return err
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			for e := range sub.Out() {
				l.mu.Lock()
				l.evs = append(l.evs, e.(T))
				close(l.more)
				l.more = make(chan struct{})
				l.mu.Unlock()
			}
		}()
		var once sync.Once
		l.stop = func() { once.Do(func() { sub.Close(); <-done }) }
		t.Cleanup(l.stop)
		return nil
	}))
}

func (l *eventLog[T]) all() []T {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.evs)
}

// waitFor waits until an event from index from on satisfies ok, and
// returns its index and the event.
func (l *eventLog[T]) waitFor(t testing.TB, from int, what string, ok func(T) bool) (int, T) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		l.mu.Lock()
		evs, more := slices.Clone(l.evs), l.more
		l.mu.Unlock()
		for i := from; i < len(evs); i++ {
			if ok(evs[i]) {
				return i, evs[i]
			}
		}
		select {
		case <-more:
		case <-timeout:
			var zero T
			t.Fatalf("no %s within 30 s; events so far: %+v", what, evs)
			return 0, zero
		}
	}
}

// wait is waitFor from 0 without failing: it reports whether an event
// satisfied ok within d.
func (l *eventLog[T]) wait(d time.Duration, ok func(T) bool) (T, bool) {
	timeout := time.After(d)
	for {
		l.mu.Lock()
		evs, more := slices.Clone(l.evs), l.more
		l.mu.Unlock()
		for _, e := range evs {
			if ok(e) {
				return e, true
			}
		}
		select {
		case <-more:
		case <-timeout:
			var zero T
			return zero, false
		}
	}
}

// last waits for at least one failure and returns the latest.
func (l *failureLog) last(t testing.TB) EvtIssuanceFailed {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		l.mu.Lock()
		n, more := len(l.evs), l.more
		var ev EvtIssuanceFailed
		if n > 0 {
			ev = l.evs[n-1]
		}
		l.mu.Unlock()
		if n > 0 {
			return ev
		}
		select {
		case <-more:
		case <-timeout:
			t.Fatal("no EvtIssuanceFailed within 30 s")
		}
	}
}

// newClockAtNow returns a fake clock at the current time, in whole seconds
// (so that an HTTP-date, which has no fraction, names an exact instant).
func newClockAtNow() *fakeClock {
	return newFakeClock(time.Now().Truncate(time.Second))
}

// leakCheck snapshots the goroutines running now; calling the function it
// returns (after closing the hosts) fails the test if any other goroutine
// is still running, after a grace period for ones that are ending.
func leakCheck(t *testing.T) func() {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	return func() {
		t.Helper()
		goleak.VerifyNone(t, append(goleakIgnores(), ignore,
			// The forge's broker serving again after BrokerUp: the forge's,
			// ended by its Close.
			goleak.IgnoreAnyFunction("github.com/p2ptls/autotls/internal/testforge.(*Forge).BrokerUp.func1"),
		)...)
	}
}

// closeAndCheck closes the rig's host and checks for leaked goroutines.
func (r *faultRig) closeAndCheck(t *testing.T, leaks func()) {
	t.Helper()
	r.close(t)
	leaks()
}

// close closes the rig's host, then runs its closers.
func (r *faultRig) close(t *testing.T) {
	t.Helper()
	if err := r.h.Close(); err != nil {
		t.Errorf("closing the host: %v", err)
	}
	for _, c := range r.closers {
		c()
	}
}

// pingOverTCP proves the host's other transports are unaffected: a fresh
// host connects to it over plain TCP (no WebSocket, no TLS from us) and a
// ping crosses.
func pingOverTCP(t *testing.T, f *testforge.Forge, h host.Host) {
	t.Helper()
	var addr ma.Multiaddr
	for _, a := range h.Network().ListenAddresses() {
		if _, err := a.ValueForProtocol(ma.P_TCP); err == nil && !strings.Contains(a.String(), "/ws") {
			addr = a
			break
		}
	}
	if addr == nil {
		t.Fatalf("no plain TCP listen address in %v", h.Network().ListenAddresses())
	}
	d, err := libp2p.New(f.DialerOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.Connect(ctx, peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{addr}}); err != nil {
		t.Fatalf("plain TCP dial to %s: %v", addr, err)
	}
	if res := <-ping.Ping(ctx, d, h.ID()); res.Error != nil {
		t.Fatalf("ping over plain TCP: %v", res.Error)
	}
}

// servedSerial returns the serial of the certificate a WSS handshake gets
// (waiting a little for the listener, which opens just after a certificate
// is loaded), or "" if there is no listener or the handshake fails.
func servedSerial(t *testing.T, r *faultRig) string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, a := range r.h.Network().ListenAddresses() {
			if !isForgeListenAddr(a, r.f.Domain) {
				continue
			}
			sni := "127-0-0-1." + testforge.PeerLabel(r.h.ID()) + "." + r.f.Domain
			st, err := tlsHandshake(tcpHostPort(t, a), sni, r.f.IssuerRoots)
			if err != nil {
				return ""
			}
			return st.PeerCertificates[0].SerialNumber.String()
		}
		if time.Now().After(deadline) {
			return ""
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// kick makes the manager renew now. It waits for the manager to be
// parked first: a wait within the horizon ends the moment it starts, and a
// kick racing it would find the clock already at the wait's end, which the
// manager takes for the wait's own expiry.
func (r *faultRig) kick(t *testing.T) {
	t.Helper()
	r.clk.WaitParked(t, 30*time.Second)
	r.m.kick <- struct{}{}
}

// waitLoaded waits for a certificate to be served, from any source.
func (r *faultRig) waitLoaded(t *testing.T) *servedCert {
	t.Helper()
	return r.waitCert(t, nil)
}

// waitCert waits for an EvtCertificateLoaded after which the manager
// serves another certificate than old, and returns it.
func (r *faultRig) waitCert(t *testing.T, old *servedCert) *servedCert {
	t.Helper()
	sub, err := r.h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case <-sub.Out():
			if c := r.m.cert.Load(); c != nil && c != old {
				return c
			}
		case <-timeout:
			t.Fatalf("no new certificate within 30 s; log:\n%s", r.logs)
		}
	}
}

// startProxiedRig starts a rig with in-memory storage whose CA is reached
// through ca (closed with the rig), its clock held before the first ARI
// poll can be due.
func startProxiedRig(t *testing.T, f *testforge.Forge, ca *testforge.CAProxy) *faultRig {
	t.Helper()
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute))
	r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
	r.closers = append(r.closers, ca.Close)
	return r
}

// startDirRig starts a rig storing in a new directory, with its clock held
// before the first ARI poll can be due, and waits for its certificate.
func startDirRig(t *testing.T, f *testforge.Forge) (r *faultRig, dir string, served *servedCert) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "store")
	st, err := storage.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute))
	r = startRig(t, f, clk, nil, nil, WithStorage(st))
	return r, dir, r.waitLoaded(t)
}

// waitRenewed waits for a certificate other than served to be served.
func (r *faultRig) waitRenewed(t *testing.T, served *servedCert) *servedCert {
	t.Helper()
	return r.waitCert(t, served)
}

// retries returns the wait before each retry, as the manager logged it
// with the failure (retry_in), in order: the run loop's own waits, apart
// from the polls and checks inside an attempt that the fake clock records
// too.
func (r *faultRig) retries() []time.Duration {
	var out []time.Duration
	for _, l := range r.logs.all() {
		if v, ok := l.attrs["retry_in"]; ok {
			out = append(out, v.Duration())
		}
	}
	return out
}

// checkBackoff checks waits against the retry rule for failures that
// name no time of their own: the wait after the n-th consecutive failure
// lies in (0, d] with d = retryBase·2^(n-1) (full jitter), or in
// [retryCap/2, retryCap] once d reaches the cap. It also checks that the
// waits are jittered.
func checkBackoff(t *testing.T, waits []time.Duration) {
	t.Helper()
	if len(waits) == 0 {
		t.Fatal("no waits to check")
	}
	ceilings := 0
	d := retryBase
	for i, w := range waits {
		lo, hi := time.Duration(1), d
		if d >= retryCap {
			lo, hi = retryCap/2, retryCap
		}
		if w < lo || w > hi {
			t.Errorf("wait %d = %v, want within [%v, %v]; all waits %v", i+1, w, lo, hi, waits)
		}
		if w == hi {
			ceilings++
		}
		d *= 2
	}
	if len(waits) >= 3 && ceilings == len(waits) {
		t.Errorf("waits %v are not jittered", waits)
	}
}

// warningsAbout returns the log lines at warning level or above.
func warnings(r *faultRig) []logLine { return r.logs.atLeast(slog.LevelWarn) }

// startCAProxy puts a proxy in front of f's CA for one test.
func startCAProxy(t *testing.T, f *testforge.Forge) *testforge.CAProxy {
	t.Helper()
	p, err := f.StartCAProxy()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// count returns how many requests to the CA matched method and path
// prefix.
func count(reqs []testforge.CARequest, method, prefix string) int {
	n := 0
	for _, r := range reqs {
		if r.Method == method && strings.HasPrefix(r.Path, prefix) {
			n++
		}
	}
	return n
}

// problem writes an ACME problem document.
func problem(w http.ResponseWriter, status int, typ, detail, retryAfter string) {
	if retryAfter != "" {
		w.Header().Set("Retry-After", retryAfter)
	}
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"type":%q,"detail":%q,"status":%d}`, typ, detail, status)
}

// countingTransport counts the requests sent through it, answered or not
// (a refused connection never reaches the broker's own counters).
type countingTransport struct {
	next http.RoundTripper
	n    atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.next.RoundTrip(r)
}

// forgetValidAuthz deactivates every authorization the host's account
// used so far at the CA behind ca, so that the next order needs a fresh
// DNS-01 challenge. Pebble reuses a valid authorization for a new order
// one time in a hundred even when told never to (it compares
// rand.Intn(100) > percent), which would let a renewal succeed without the
// broker and turn a fault test into a coin toss.
func forgetValidAuthz(t *testing.T, r *faultRig, ca *testforge.CAProxy) {
	t.Helper()
	acct, err := r.m.issuer.getAccount(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Roots}}
	defer tr.CloseIdleConnections()
	client := &acme.Client{Directory: ca.URL, HTTPClient: &http.Client{Transport: tr}}
	base := strings.TrimSuffix(ca.URL, "/dir")
	seen := map[string]bool{}
	for _, q := range ca.Requests() {
		if !strings.HasPrefix(q.Path, "/authZ/") || seen[q.Path] {
			continue
		}
		seen[q.Path] = true
		if _, err := client.DeactivateAuthorization(t.Context(), acct, base+q.Path); err != nil {
			t.Fatalf("deactivating %s: %v", q.Path, err)
		}
	}
}

// drain returns what is buffered on c without waiting.
func drain(c <-chan any) []any {
	var out []any
	for {
		select {
		case e := <-c:
			out = append(out, e)
		default:
			return out
		}
	}
}
func ecdsaKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
func pemKey(t *testing.T, k *ecdsa.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}
