package autotls

// Fault tests: issue #5, "every failure named, nothing lost". Each drives
// the real components (Pebble, the test broker with its libp2p dial-back,
// the forge's DNS, real libp2p hosts, the file system) into one fault and
// checks what an operator running this unattended relies on: one clear log
// line, a bounded backoff that honours Retry-After, recovery by itself, the
// host's other transports untouched, the certificate in use kept, and no
// goroutine left behind. Time is the fake clock of clock_test.go: the
// manager's backoff runs at production values (minutes to hours) and is
// asserted from the waits it asks for, never from a stopwatch.
//
// docs/reliability.md maps each fault to the tests here.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	"github.com/mholt/acmez/v3/acme"
	"github.com/miekg/dns"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/goleak"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
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
	text  string // the whole line, attributes included
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
	h.c.lines = append(h.c.lines, logLine{level: r.Level, msg: r.Message, text: h.c.out.String()})
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
	f    *testforge.Forge
	h    host.Host
	m    *manager
	clk  *fakeClock
	logs *logCapture
	// closers run after the host is closed, before the leak check (idle
	// connections of HTTP clients the test gave the host).
	closers []func()
}

// startRig builds a loopback host with autotls pointed at f, on the fake
// clock clk, logging into a capture. edit, if not nil, adjusts the
// manager before it starts (retry bounds, TXT wait).
func startRig(t *testing.T, f *testforge.Forge, clk *fakeClock, libp2pOpts []libp2p.Option, edit func(*manager), opts ...Opt) *faultRig {
	t.Helper()
	r := &faultRig{f: f, clk: clk, logs: &logCapture{}}
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
			// certmagic's FileStorage refreshes a held lock every 5 s from
			// a goroutine that notices the lock is gone only at its next
			// tick; it is not joined by anything (certmagic's design).
			goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
			// The forge's broker serving again after BrokerUp: the forge's,
			// ended by its Close.
			goleak.IgnoreAnyFunction("github.com/p2ptls/autotls/internal/testforge.(*Forge).BrokerUp.func1"),
		)...)
	}
}

// closeAndCheck closes the rig's host and checks for leaked goroutines.
func (r *faultRig) closeAndCheck(t *testing.T, leaks func()) {
	t.Helper()
	if err := r.h.Close(); err != nil {
		t.Errorf("closing the host: %v", err)
	}
	for _, c := range r.closers {
		c()
	}
	leaks()
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
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c := r.m.cert.Load(); c != nil {
			return c
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no certificate within 30 s; log:\n%s", r.logs)
	return nil
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
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c := r.m.cert.Load(); c != nil && c != served {
			return c
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("not renewed within 30 s; log:\n%s", r.logs)
	return nil
}

// checkBackoff checks waits against the manager's retry rule: the wait
// after the n-th consecutive failure lies in [d/2, d] with d =
// base·2^(n-1) capped at max, and lower bounds from Retry-After are
// checked by the callers. It also checks that the waits are jittered.
func checkBackoff(t *testing.T, waits []time.Duration, base, maxDelay time.Duration) {
	t.Helper()
	if len(waits) == 0 {
		t.Fatal("no waits to check")
	}
	exact := 0
	d := base
	for i, w := range waits {
		if w < d/2 || w > d {
			t.Errorf("wait %d = %v, want within [%v, %v]; all waits %v", i+1, w, d/2, d, waits)
		}
		if w == d {
			exact++
		}
		d = min(2*d, maxDelay)
	}
	if len(waits) >= 3 && exact == len(waits) {
		t.Errorf("waits %v are not jittered", waits)
	}
}

// warningsAbout returns the log lines at warning level or above.
func warnings(r *faultRig) []logLine { return r.logs.atLeast(slog.LevelWarn) }

// TestFaultBrokerTransient: a broker answering 5xx, refusing connections
// or hanging is a transient failure: the manager backs off exponentially
// with jitter, within [retryBase, retryMax], says so once at warning
// level, and obtains the certificate by itself once the broker is back.
// It covers both gates: the health check before the first issuance, and
// the registration inside an ACME order.
func TestFaultBrokerTransient(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name string
		// path is the broker path the fault applies to ("" for a fault
		// of the whole broker).
		path string
		// fault answers a request while the broker is faulty.
		fault func(w http.ResponseWriter, r *http.Request)
		// refuse takes the broker's listener down instead.
		refuse bool
		// httpTimeout, if set, bounds each broker request (for the hang).
		httpTimeout time.Duration
		horizon     time.Duration
	}{
		{name: "503 on health", path: healthPath, horizon: 30 * time.Minute, fault: func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "upstream connect error or disconnect/reset before headers", http.StatusServiceUnavailable)
		}},
		{name: "500 on register", path: registerPath, horizon: 30 * time.Minute, fault: func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "error storing value: dynamodb: throttled", http.StatusInternalServerError)
		}},
		{name: "connection refused", refuse: true, horizon: 30 * time.Minute},
		{name: "hang on health", path: healthPath, httpTimeout: time.Second, horizon: time.Minute, fault: func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done()
		}},
		{name: "hang on register", path: registerPath, httpTimeout: time.Second, horizon: time.Minute, fault: func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			var down atomic.Bool
			var faulted atomic.Int32
			down.Store(true)
			if tc.fault != nil {
				f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
					if !down.Load() || (tc.path != "" && r.URL.Path != tc.path) {
						return false
					}
					faulted.Add(1)
					tc.fault(w, r)
					return true
				})
				defer f.SetBrokerFault(nil)
			}
			if tc.refuse {
				if err := f.BrokerDown(); err != nil {
					t.Fatal(err)
				}
			}
			var opts []Opt
			tr := http.DefaultTransport.(*http.Transport).Clone()
			if tc.httpTimeout > 0 {
				opts = append(opts, WithHTTPClient(&http.Client{Transport: tr, Timeout: tc.httpTimeout}))
			}
			clk := newClockAtNow()
			start := clk.Now()
			clk.SetHorizon(start.Add(tc.horizon))
			r := startRig(t, f, clk, nil, nil, append(opts, WithStorage(storage.Memory()))...)
			r.closers = append(r.closers, tr.CloseIdleConnections)

			clk.WaitParked(t, 30*time.Second)
			waits := clk.Waits()
			if len(waits) < 2 {
				t.Fatalf("%d attempts in %v of outage, want several; log:\n%s", len(waits), tc.horizon, r.logs)
			}
			checkBackoff(t, waits, defaultRetryBase, defaultRetryMax)
			if tc.fault != nil && int(faulted.Load()) != len(waits) {
				t.Errorf("%d faulted broker requests for %d failed attempts: each attempt should cost one", faulted.Load(), len(waits))
			}
			if r.m.cert.Load() != nil {
				t.Fatal("a certificate is served although the broker is down")
			}
			w := warnings(r)
			if len(w) != 1 {
				t.Fatalf("%d warnings for one outage, want 1:\n%s", len(w), r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			if !strings.Contains(w[0].text, "broker") {
				t.Errorf("the warning does not name the broker: %s", w[0].text)
			}
			pingOverTCP(t, f, r.h)

			// The broker returns: the parked retry fires and succeeds.
			down.Store(false)
			if tc.refuse {
				if err := f.BrokerUp(); err != nil {
					t.Fatal(err)
				}
			}
			clk.SetHorizon(clk.Now().Add(defaultRetryMax))
			c := r.waitLoaded(t)
			if servedSerial(t, r) != c.leaf.SerialNumber.String() {
				t.Error("the WSS listener does not serve the certificate obtained after the outage")
			}
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
	}
}

// TestFaultBrokerRetryAfter: a 429 or 503 with Retry-After, as
// delay-seconds or as an HTTP-date, on the health check or on the
// registration, holds the next request back at least that long (on the
// fake clock, the time between the two requests is exactly what the
// manager waited), even when the backoff alone would retry sooner.
func TestFaultBrokerRetryAfter(t *testing.T) {
	f := startForge(t, testforge.Config{})
	const after = 2 * time.Hour // longer than the backoff's first steps
	for _, status := range []int{http.StatusTooManyRequests, http.StatusServiceUnavailable} {
		for _, form := range []string{"seconds", "date"} {
			for _, path := range []string{healthPath, registerPath} {
				t.Run(fmt.Sprintf("%d %s on %s", status, form, path), func(t *testing.T) {
					leaks := leakCheck(t)
					clk := newClockAtNow()
					clk.SetHorizon(clk.Now().Add(24 * time.Hour))
					type hit struct {
						at       time.Time // fake time of the request
						notUntil time.Time // what its Retry-After asked for, if faulted
					}
					var mu sync.Mutex
					var hits []hit
					f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
						if r.URL.Path != path {
							return false
						}
						mu.Lock()
						defer mu.Unlock()
						h := hit{at: clk.Now()}
						faulty := len(hits) < 2
						if faulty {
							h.notUntil = h.at.Add(after)
							v := fmt.Sprint(int(after / time.Second))
							if form == "date" {
								v = h.notUntil.UTC().Format(http.TimeFormat)
							}
							w.Header().Set("Retry-After", v)
							http.Error(w, "slow down", status)
						}
						hits = append(hits, h)
						return faulty
					})
					defer f.SetBrokerFault(nil)

					r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()))
					r.waitLoaded(t)
					mu.Lock()
					got := append([]hit(nil), hits...)
					mu.Unlock()
					if len(got) < 3 {
						t.Fatalf("%d requests to %s, want 2 refused and 1 served", len(got), path)
					}
					for i := 0; i < 2; i++ {
						if got[i+1].at.Before(got[i].notUntil) {
							t.Errorf("request %d came %v after a Retry-After of %v", i+2, got[i+1].at.Sub(got[i].at), after)
						}
					}
					// The backoff alone would have retried after a minute.
					if w := clk.Waits(); len(w) < 2 || w[0] < after {
						t.Errorf("waits %v, want the first at least %v", w, after)
					}
					pingOverTCP(t, f, r.h)
					r.closeAndCheck(t, leaks)
				})
			}
		}
	}
}

// deadTCPAddr returns a loopback TCP address on which nothing listens.
func deadTCPAddr(t *testing.T) ma.Multiaddr {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port))
}

// TestFaultBrokerUnreachable: the broker's real dial-back fails (the host
// announces an address nothing listens on, as behind a closed port), so
// it answers 400 "error testing addresses". The warning says the node is
// not reachable from outside and what to check; retries are no sooner
// than unreachableMin/2 apart (jitter below unreachableMin), never the
// one-minute backoff; once the address is right, the next retry succeeds.
func TestFaultBrokerUnreachable(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	dead := deadTCPAddr(t)
	var closed atomic.Bool
	closed.Store(true)
	factory := func(in []ma.Multiaddr) []ma.Multiaddr {
		if closed.Load() {
			return []ma.Multiaddr{dead}
		}
		return in
	}
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(2 * time.Hour))
	r := startRig(t, f, clk, []libp2p.Option{libp2p.AddrsFactory(factory)}, nil, WithStorage(storage.Memory()))
	clk.WaitParked(t, 30*time.Second)

	sub, err := r.h.EventBus().Subscribe(new(EvtIssuanceFailed))
	if err != nil {
		t.Fatal(err)
	}
	ev := (<-sub.Out()).(EvtIssuanceFailed) // stateful: the latest failure
	sub.Close()
	var be *BrokerError
	if !errors.As(ev.Err, &be) || !be.Unreachable() || !strings.Contains(be.Body, "error testing addresses") {
		t.Fatalf("failure %v, want the broker's 400 \"error testing addresses\"", ev.Err)
	}
	waits := clk.Waits()
	for i, w := range waits {
		if w < unreachableMin/2 {
			t.Errorf("retry %d after %v: a tight retry cannot help an unreachable node (want ≥ %v)", i+1, w, unreachableMin/2)
		}
	}
	if len(waits) > int(2*time.Hour/(unreachableMin/2))+1 {
		t.Errorf("%d attempts in 2 h", len(waits))
	}
	w := warnings(r)
	if len(w) != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
	}
	t.Logf("the operator reads: %s", w[0].text)
	for _, want := range []string{"dial this node back", "reachable from the internet", "port forwarding", "firewall", "error testing addresses"} {
		if !strings.Contains(w[0].text, want) {
			t.Errorf("the warning does not say %q", want)
		}
	}
	pingOverTCP(t, f, r.h)

	closed.Store(false) // the port is forwarded now
	clk.SetHorizon(clk.Now().Add(defaultRetryMax))
	r.waitLoaded(t)
	r.closeAndCheck(t, leaks)
}

// TestFaultBrokerForbidden: a 403 (a missing or wrong access token, or an
// address on the broker's denylist) is not retried soon: the warning says
// refused, 403, and to check the token or the denylist; the next attempt
// is hours away (retryMax with jitter), so a day costs a handful of
// requests; a host restarted with the right token succeeds.
func TestFaultBrokerForbidden(t *testing.T) {
	const token = "tok-7d1e-correct-horse"
	f := startForge(t, testforge.Config{AccessToken: token})
	for _, tc := range []struct {
		name  string
		opts  []Opt
		fault func(w http.ResponseWriter, r *http.Request) bool
	}{
		{name: "missing token"},
		{name: "wrong token", opts: []Opt{WithAccessToken("tok-wrong-battery-staple")}},
		// The test broker has no denylist (its checks are the public
		// broker's otherwise): a fake answer with the public broker's
		// status and body (protocol §2.4 step 9).
		{name: "denylisted", opts: []Opt{WithAccessToken(token)}, fault: func(w http.ResponseWriter, r *http.Request) bool {
			if r.URL.Path != registerPath {
				return false
			}
			http.Error(w, "403 Forbidden: client IP 127.0.0.1 blocked by spamhaus-drop", http.StatusForbidden)
			return true
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			f.SetBrokerFault(tc.fault)
			defer f.SetBrokerFault(nil)
			before := f.Stats()
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(24 * time.Hour))
			r := startRig(t, f, clk, nil, nil, append(tc.opts, WithStorage(storage.Memory()))...)
			clk.WaitParked(t, 30*time.Second)

			waits := clk.Waits()
			for i, w := range waits {
				if w < defaultRetryMax/2 {
					t.Errorf("retry %d after %v; a refusal needs a change first (want ≥ %v)", i+1, w, defaultRetryMax/2)
				}
			}
			used := f.Stats()
			reqs := used.Health + used.Challenge - before.Health - before.Challenge
			t.Logf("a day of 403s: %d attempts, %d broker requests", len(waits), reqs)
			if len(waits) > 9 {
				t.Errorf("%d attempts in a day", len(waits))
			}
			w := warnings(r)
			if len(w) != 1 {
				t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			for _, want := range []string{"refused", "403", "access token", "denylisted"} {
				if !strings.Contains(w[0].text, want) {
					t.Errorf("the warning does not say %q", want)
				}
			}
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
	}
	t.Run("restart with the token", func(t *testing.T) {
		leaks := leakCheck(t)
		r := startRig(t, f, newClockAtNow(), nil, nil, WithAccessToken(token), WithStorage(storage.Memory()))
		r.waitLoaded(t)
		r.closeAndCheck(t, leaks)
	})
}

// TestFaultBrokerGarbage: what a broker (or a proxy in front of it) may
// send besides a proper answer: binary garbage with terminal escapes, a
// body without end, a body cut short, a 200 page where 204 was due, a
// mangled PeerID-auth challenge. Each gives a BrokerError whose body
// excerpt is short, valid UTF-8 and free of control characters, one log
// line that stays one line, no panic, a bounded read (the endless body is
// abandoned after a bounded amount), and recovery once the broker is sane.
func TestFaultBrokerGarbage(t *testing.T) {
	f := startForge(t, testforge.Config{})
	garbage := append([]byte("\x1b[2J\x1b[31mFAKE LOG LINE\nlevel=ERROR msg=pwned\r\n\x00\xff\xfe"), bytes.Repeat([]byte{0xc3, 0x28, 0x07}, 400)...)
	var streamed atomic.Int64
	// truncate promises 1000 bytes of body and hangs up after 17.
	truncate := func(w http.ResponseWriter, r *http.Request) {
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		_, _ = buf.WriteString("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000\r\n\r\nerror storing val")
		_ = buf.Flush()
		_ = conn.Close()
	}
	for _, tc := range []struct {
		name  string
		path  string
		fault func(w http.ResponseWriter, r *http.Request)
		check func(t *testing.T, be *BrokerError)
	}{
		{name: "binary garbage", path: registerPath, fault: func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusBadGateway)
			_, _ = w.Write(garbage)
		}},
		{name: "endless body", path: healthPath, fault: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(http.StatusServiceUnavailable)
			chunk := bytes.Repeat([]byte("<p>maintenance</p>"), 4096)
			for r.Context().Err() == nil {
				n, err := w.Write(chunk)
				streamed.Add(int64(n))
				if err != nil {
					return
				}
			}
		}, check: func(t *testing.T, be *BrokerError) {
			if be.StatusCode != http.StatusServiceUnavailable {
				t.Errorf("status %d, want 503", be.StatusCode)
			}
		}},
		{name: "endless body on register", path: registerPath, fault: func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusBadGateway)
			chunk := bytes.Repeat([]byte("<p>bad gateway</p>"), 4096)
			for r.Context().Err() == nil {
				n, err := w.Write(chunk)
				streamed.Add(int64(n))
				if err != nil {
					return
				}
			}
		}},
		{name: "truncated body on health", path: healthPath, fault: truncate, check: func(t *testing.T, be *BrokerError) {
			if be.StatusCode != http.StatusInternalServerError || !errors.Is(be.Err, io.ErrUnexpectedEOF) {
				t.Errorf("got status %d, err %v; want 500 with an unexpected EOF", be.StatusCode, be.Err)
			}
		}},
		// On the registration, the PeerID-auth layer reads the response
		// first: the failure is its (no handshake), with the status and
		// what arrived of the body.
		{name: "truncated body on register", path: registerPath, fault: truncate, check: func(t *testing.T, be *BrokerError) {
			if be.StatusCode != http.StatusInternalServerError || be.Body != "error storing val" {
				t.Errorf("got status %d, body %q; want 500 with what arrived", be.StatusCode, be.Body)
			}
		}},
		{name: "200 page for health", path: healthPath, fault: func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.WriteString(w, "<html><body>Please log in to the hotel Wi-Fi</body></html>")
		}},
		{name: "mangled auth challenge", path: registerPath, fault: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("WWW-Authenticate", `libp2p-PeerID challenge-client="\x00", public-key="!!!notbase64", sig=, opaque`)
			w.WriteHeader(http.StatusUnauthorized)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			var sane atomic.Bool
			f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
				if sane.Load() || r.URL.Path != tc.path {
					return false
				}
				tc.fault(w, r)
				return true
			})
			defer f.SetBrokerFault(nil)
			streamed.Store(0)
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(30 * time.Second))
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()))
			clk.WaitParked(t, 30*time.Second)

			sub, err := r.h.EventBus().Subscribe(new(EvtIssuanceFailed))
			if err != nil {
				t.Fatal(err)
			}
			ev := (<-sub.Out()).(EvtIssuanceFailed)
			sub.Close()
			var be *BrokerError
			if !errors.As(ev.Err, &be) {
				t.Fatalf("failure %v is not a BrokerError", ev.Err)
			}
			if len(be.Body) > maxErrorBody || !utf8.ValidString(be.Body) || strings.ContainsFunc(be.Body, unicode.IsControl) {
				t.Errorf("body excerpt of %d bytes, valid UTF-8 %v, or with control characters: %q", len(be.Body), utf8.ValidString(be.Body), be.Body)
			}
			if tc.check != nil {
				tc.check(t, be)
			}
			if n := streamed.Load(); n > 16<<20 {
				t.Errorf("%d bytes of an endless body were read or buffered, want a bounded read", n)
			} else if n > 0 {
				t.Logf("the endless body was abandoned after the broker had sent %d bytes", n)
			}
			w := warnings(r)
			if len(w) != 1 {
				t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			if strings.Count(w[0].text, "\n") != 1 || strings.Contains(w[0].text, "\x1b") {
				t.Errorf("the warning is not one clean line: %q", w[0].text)
			}
			pingOverTCP(t, f, r.h)

			sane.Store(true)
			clk.SetHorizon(clk.Now().Add(defaultRetryMax))
			r.waitLoaded(t)
			r.closeAndCheck(t, leaks)
		})
	}
}

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

// TestFaultTXTNeverVisible: the broker accepts the challenge but its DNS
// never shows it. The TXT check gives up after its bound (shortened here
// from 3 min), the CA is never asked to validate (no POST to a challenge:
// an authorization that fails validation counts against the CA's limits),
// the attempt is retried with backoff, and succeeds once DNS answers.
func TestFaultTXTNeverVisible(t *testing.T) {
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	var hide atomic.Bool
	hide.Store(true)
	f.SetDNSFault(func(q dns.Question) testforge.DNSFault {
		return testforge.DNSFault{HideTXT: hide.Load()}
	})
	defer f.SetDNSFault(nil)

	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(5 * time.Minute))
	r := startRig(t, f, clk, nil, func(m *manager) { m.txtWait = 300 * time.Millisecond },
		WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
	r.closers = append(r.closers, ca.Close)
	clk.WaitParked(t, 30*time.Second)

	waits := clk.Waits()
	checkBackoff(t, waits, defaultRetryBase, defaultRetryMax)
	reqs := ca.Requests()
	if n := count(reqs, http.MethodPost, "/order-plz"); n != len(waits) {
		t.Errorf("%d orders for %d failed attempts", n, len(waits))
	}
	if n := count(reqs, http.MethodPost, "/chalZ/"); n != 0 {
		t.Fatalf("the CA was asked %d times to validate a TXT record that is not visible", n)
	}
	w := warnings(r)
	if len(w) != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
	}
	t.Logf("the operator reads: %s", w[0].text)
	if !strings.Contains(w[0].text, "not visible") {
		t.Errorf("the warning does not say the TXT record is not visible")
	}
	pingOverTCP(t, f, r.h)

	hide.Store(false)
	clk.SetHorizon(clk.Now().Add(defaultRetryMax))
	r.waitLoaded(t)
	if n := count(ca.Requests(), http.MethodPost, "/chalZ/"); n != 1 {
		t.Errorf("%d validation requests for the successful attempt, want 1", n)
	}
	r.closeAndCheck(t, leaks)
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

// TestFaultCARefusesReplaces: at renewal the order names the certificate it
// replaces (ARI). A CA that cannot find that certificate (Pebble answers 500
// for some serials; Let's Encrypt says alreadyReplaced when an earlier order
// named it) must not keep the host from renewing: the same attempt orders
// again without "replaces", and the renewal goes through with no warning.
func TestFaultCARefusesReplaces(t *testing.T) {
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodPost || r.URL.Path != "/order-plz" {
			return false
		}
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body)) // for the CA, if proxied
		if orderReplaces(t, body) == "" {
			return false
		}
		problem(w, http.StatusInternalServerError, acme.ProblemTypeNamespace+"serverInternal",
			"could not find an order for the given certificate: could not find order resulting in the given certificate serial number", "")
		return true
	})
	r := startProxiedRig(t, f, ca)
	served := r.waitLoaded(t)

	r.kick(t) // renewal due
	renewed := r.waitRenewed(t, served)
	if samePublicKey(renewed.leaf.PublicKey, served.leaf.PublicKey) {
		t.Error("the renewed certificate has the old one's key")
	}
	var with, without int
	for _, req := range ca.Requests() {
		if req.Method != http.MethodPost || req.Path != "/order-plz" {
			continue
		}
		if orderReplaces(t, req.Body) != "" {
			with++
		} else {
			without++
		}
	}
	// One order at issuance; at renewal the refused one (the ACME client
	// itself tries a 500 up to three times), then one without "replaces".
	if with == 0 || without != 2 {
		t.Errorf("orders naming the replaced certificate: %d, without: %d; want some, and 2", with, without)
	}
	if w := warnings(r); len(w) != 0 {
		t.Errorf("%d warnings, want none:\n%s", len(w), r.logs)
	}
	r.closeAndCheck(t, leaks)
}

// orderReplaces returns the "replaces" field of a new-order request's JWS
// body.
func orderReplaces(t *testing.T, raw []byte) string {
	t.Helper()
	var jws struct {
		Payload string `json:"payload"`
	}
	if err := json.Unmarshal(raw, &jws); err != nil {
		t.Errorf("a new-order request is not a JWS: %v", err)
		return ""
	}
	payload, err := base64.RawURLEncoding.DecodeString(jws.Payload)
	if err != nil {
		t.Errorf("a new-order payload is not base64url: %v", err)
		return ""
	}
	var order struct {
		Replaces string `json:"replaces"`
	}
	if err := json.Unmarshal(payload, &order); err != nil {
		t.Errorf("a new-order payload is not JSON: %v", err)
	}
	return order.Replaces
}

// TestFaultCA drives the CA into its failures: Pebble rejecting half the
// nonces (badNonce), an authorization that fails validation (the CA sees
// another TXT value than the host did), rate limiting (429 rateLimited, or
// the 503 of an overall request limit, with Retry-After as seconds and as
// an HTTP-date; Pebble has no rate limits, so the proxy answers for it),
// and Retry-After on authorization and order polls (Pebble's own).
func TestFaultCA(t *testing.T) {
	t.Run("badNonce at 50%", func(t *testing.T) {
		f := startForge(t, testforge.Config{NonceRejectPercent: 50})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		// One issuance sends about ten signed requests: all of them get
		// through one time in a thousand, so issue again until one nonce
		// was refused.
		for i := 0; ; i++ {
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(time.Hour))
			before := len(ca.Requests())
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
			r.waitLoaded(t)
			reqs := ca.Requests()[before:]
			bad := 0
			for _, q := range reqs {
				if q.Status == http.StatusBadRequest {
					bad++
				}
			}
			t.Logf("issued through %d CA requests, %d of them refused for their nonce (retried by the ACME client); %d attempts failed for the manager", len(reqs), bad, len(warnings(r)))
			if err := r.h.Close(); err != nil {
				t.Fatal(err)
			}
			if bad > 0 {
				break
			}
			if i == 2 {
				t.Fatal("Pebble rejected no nonce in three issuances: the fault did not happen")
			}
		}
		ca.Close()
		leaks()
	})

	t.Run("invalid authorization", func(t *testing.T) {
		f := startForge(t, testforge.Config{})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		// The host sees its TXT record; once it asks the CA to validate,
		// the CA is shown "not set yet" — for the first attempt only.
		var hide atomic.Bool
		var validations atomic.Int32
		f.SetDNSFault(func(q dns.Question) testforge.DNSFault { return testforge.DNSFault{HideTXT: hide.Load()} })
		defer f.SetDNSFault(nil)
		ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
			switch {
			case r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/chalZ/"):
				hide.Store(validations.Add(1) == 1)
			case r.Method == http.MethodPost && r.URL.Path == "/order-plz":
				hide.Store(false)
			}
			return false
		})
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(time.Hour))
		r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
		r.closers = append(r.closers, ca.Close)
		r.waitLoaded(t)

		sub, err := r.h.EventBus().Subscribe(new(EvtIssuanceFailed))
		if err != nil {
			t.Fatal(err)
		}
		ev := (<-sub.Out()).(EvtIssuanceFailed)
		sub.Close()
		var prob acme.Problem
		if !errors.As(ev.Err, &prob) {
			t.Fatalf("failure %v carries no ACME problem", ev.Err)
		}
		if validations.Load() != 2 {
			t.Errorf("%d validations, want 2 (one failed, one passed)", validations.Load())
		}
		// Let's Encrypt allows 5 failed validations per identifier per
		// account per hour (one more every 12 minutes).
		if w := clk.Waits(); len(w) == 0 || w[0] < 12*time.Minute {
			t.Errorf("retried %v after a failed validation; want ≥ 12 min to stay within the CA's 5 failures per hour", w)
		}
		w := warnings(r)
		if len(w) != 1 {
			t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
		}
		t.Logf("the operator reads: %s", w[0].text)
		r.closeAndCheck(t, leaks)
	})

	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name   string
		status int
		typ    string
		form   string
	}{
		{"rate limited, seconds", http.StatusTooManyRequests, acme.ProblemTypeRateLimited, "seconds"},
		{"rate limited, date", http.StatusTooManyRequests, acme.ProblemTypeRateLimited, "date"},
		{"overall limit 503, seconds", http.StatusServiceUnavailable, acme.ProblemTypeNamespace + "serverInternal", "seconds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca := startCAProxy(t, f)
			leaks := leakCheck(t)
			const after = 3 * time.Hour
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(24 * time.Hour))
			type order struct {
				fake, real time.Time // when it arrived, on both clocks
				deadline   time.Time // real time its Retry-After named, if refused
			}
			var mu sync.Mutex
			var orders []order
			ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method != http.MethodPost || r.URL.Path != "/order-plz" {
					return false
				}
				mu.Lock()
				defer mu.Unlock()
				o := order{fake: clk.Now(), real: time.Now()}
				// Refuse the first attempt, with the ACME client's own
				// retries inside it (at the same manager time).
				if len(orders) > 0 && !o.fake.Equal(orders[0].fake) {
					orders = append(orders, o)
					return false
				}
				v := fmt.Sprint(int(after / time.Second))
				o.deadline = o.real.Add(after)
				if tc.form == "date" {
					// An HTTP-date has whole seconds: round up.
					o.deadline = o.real.Add(after).Truncate(time.Second).Add(time.Second)
					v = o.deadline.UTC().Format(http.TimeFormat)
				}
				orders = append(orders, o)
				problem(w, tc.status, tc.typ, "too many new orders recently: see https://letsencrypt.org/docs/rate-limits/", v)
				return true
			})
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
			r.closers = append(r.closers, ca.Close)
			r.waitLoaded(t)
			mu.Lock()
			defer mu.Unlock()
			refused, last := orders[:len(orders)-1], orders[len(orders)-1]
			// The manager waited (on its clock) from the refusal to the
			// next order; it computed the wait from the real clock, at
			// some instant before the next order arrived. Sent at that
			// instant plus the wait, the next order would come no sooner
			// than the Retry-After named.
			waited := last.fake.Sub(refused[len(refused)-1].fake)
			if earliest := last.real.Add(waited); earliest.Before(refused[len(refused)-1].deadline) {
				t.Errorf("the manager waited %v after a Retry-After of %v: %v early", waited, after, refused[len(refused)-1].deadline.Sub(earliest))
			}
			t.Logf("new-order requests: %d refused within the first attempt (the ACME client's own retries), then 1 after %v", len(refused), waited.Round(time.Second))
			w := warnings(r)
			if len(w) != 1 {
				t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			r.closeAndCheck(t, leaks)
		})
	}

	t.Run("Retry-After on polls", func(t *testing.T) {
		f := startForge(t, testforge.Config{RetryAfterAuthz: 1, RetryAfterOrder: 1})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		r := startProxiedRig(t, f, ca)
		r.waitLoaded(t)
		reqs := ca.Requests()
		checked := 0
		for i, q := range reqs {
			d, ok := parseRetryAfter(q.RetryAfter, q.Received)
			if !ok || d == 0 || strings.Contains(q.Path, "renewalInfo") {
				continue
			}
			notBefore := q.Received.Add(d)
			// The poll a Retry-After is for: the same URL, or the order
			// after its finalization.
			next := strings.Replace(q.Path, "/finalize-order/", "/my-order/", 1)
			for _, n := range reqs[i+1:] {
				if n.Path != next {
					continue
				}
				checked++
				if n.Received.Before(notBefore) {
					t.Errorf("%s polled %v after %s said to wait until %v", n.Path, n.Received.Sub(q.Received), q.Path, q.RetryAfter)
				}
				break
			}
		}
		if checked == 0 {
			for _, q := range reqs {
				t.Logf("%s %s %d %q", q.Method, q.Path, q.Status, q.RetryAfter)
			}
			t.Fatal("no poll followed a Retry-After: the fault did not happen")
		}
		t.Logf("%d polls followed a Retry-After, none early", checked)
		r.closeAndCheck(t, leaks)
	})
}

// storedFiles names the on-disk files of a host's certificate.
type storedFiles struct {
	dir             string
	cert, key, meta string // paths
}

func filesFor(dir string, f *testforge.Forge, caURL string, id peer.ID) storedFiles {
	fs := &certmagic.FileStorage{Path: dir}
	ik, name := issuerKey(caURL), certName(id, f.Domain)
	return storedFiles{
		dir:  dir,
		cert: fs.Filename(certmagic.StorageKeys.SiteCert(ik, name)),
		key:  fs.Filename(certmagic.StorageKeys.SitePrivateKey(ik, name)),
		meta: fs.Filename(certmagic.StorageKeys.SiteMeta(ik, name)),
	}
}

// issueToDir runs a host with identity key until it has a certificate in
// an on-disk store at dir, and closes it.
func issueToDir(t *testing.T, f *testforge.Forge, key crypto.PrivKey, dir string) EvtCertificateLoaded {
	t.Helper()
	st, err := storage.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	h := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, WithStorage(st))
	ev := waitCert(t, h, 30*time.Second)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	return ev
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustWrite(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestFaultStorage: what a disk does to the stored certificate. In every
// case the error is named, a wrong certificate is never served, a valid
// one is never deleted (an unreadable one is waited for, not replaced:
// issuing again would spend the CA's five-per-week limit on a name), and
// the manager recovers by itself once the storage is fixed.
func TestFaultStorage(t *testing.T) {
	f := startForge(t, testforge.Config{})
	other := genKey(t, crypto.Ed25519)
	otherKey := ecdsaKey(t)
	otherCert, err := f.IssueDirect(t.Context(), idOf(t, other), otherKey)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		// spoil damages the stored certificate; fix repairs it, if the
		// fix is the operator's (nil: the manager replaces it itself).
		spoil, fix func(t *testing.T, s storedFiles, good map[string][]byte)
		// replaced: the damaged certificate is replaced by a new one
		// (else the good one is served again once fixed).
		replaced bool
		want     string // in the warning
	}{
		{
			name: "unreadable",
			spoil: func(t *testing.T, s storedFiles, _ map[string][]byte) {
				// A directory where the file was: a read error even for
				// root, to whom permission bits do not apply.
				if err := os.Remove(s.cert); err != nil {
					t.Fatal(err)
				}
				if err := os.Mkdir(s.cert, 0o700); err != nil {
					t.Fatal(err)
				}
			},
			fix: func(t *testing.T, s storedFiles, good map[string][]byte) {
				if err := os.Remove(s.cert); err != nil {
					t.Fatal(err)
				}
				mustWrite(t, s.cert, good["cert"])
			},
			want: "is a directory",
		},
		{
			name: "corrupt PEM",
			spoil: func(t *testing.T, s storedFiles, good map[string][]byte) {
				b := bytes.Clone(good["cert"])
				copy(b[len(b)/2:], "\x00\x00garbage\x00\x00")
				mustWrite(t, s.cert, b)
			},
			replaced: true,
			want:     "do not form a pair",
		},
		{
			name: "certificate for another name",
			spoil: func(t *testing.T, s storedFiles, _ map[string][]byte) {
				// A valid pair from the same CA, for another peer's name.
				mustWrite(t, s.cert, otherCert[0].ChainPEM)
				mustWrite(t, s.key, pemKey(t, otherKey))
			},
			replaced: true,
			want:     "not *.",
		},
		{
			name: "key not matching the certificate",
			spoil: func(t *testing.T, s storedFiles, _ map[string][]byte) {
				mustWrite(t, s.key, pemKey(t, ecdsaKey(t)))
			},
			replaced: true,
			want:     "do not form a pair",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := genKey(t, crypto.Ed25519)
			dir := filepath.Join(t.TempDir(), "store")
			issueToDir(t, f, key, dir)
			s := filesFor(dir, f, f.CAURL, idOf(t, key))
			good := map[string][]byte{"cert": mustRead(t, s.cert), "key": mustRead(t, s.key)}
			tc.spoil(t, s, good)
			goodPair, err := tls.X509KeyPair(good["cert"], good["key"])
			if err != nil {
				t.Fatal(err)
			}
			firstSerial := goodPair.Leaf.SerialNumber

			leaks := leakCheck(t)
			before := f.Stats()
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(10 * time.Minute))
			st, err := storage.Dir(dir)
			if err != nil {
				t.Fatal(err)
			}
			r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st))
			loaded, err := r.h.EventBus().Subscribe(new(EvtCertificateLoaded))
			if err != nil {
				t.Fatal(err)
			}
			defer loaded.Close()

			if tc.replaced {
				c := r.waitLoaded(t)
				if c.leaf.SerialNumber.Cmp(firstSerial) == 0 {
					t.Fatal("the damaged certificate was served")
				}
				// One, or none if the CA reused the authorization it
				// validated for the damaged certificate.
				if got := f.Stats().Registered - before.Registered; got > 1 {
					t.Errorf("%d registrations to replace it, want 1", got)
				}
				// Moved aside for the operator, not deleted.
				if _, err := os.Stat(s.cert + asideSuffix); err != nil {
					t.Errorf("the damaged certificate was not kept aside: %v", err)
				}
			} else {
				clk.WaitParked(t, 30*time.Second)
				if r.m.cert.Load() != nil {
					t.Fatal("a certificate is served from unreadable storage")
				}
				if d := f.Stats().CA - before.CA; d != 0 {
					t.Errorf("%d CA requests: an unreadable certificate must not be replaced by a new order", d)
				}
				pingOverTCP(t, f, r.h)
				tc.fix(t, s, good)
				clk.SetHorizon(clk.Now().Add(defaultRetryMax))
				c := r.waitLoaded(t)
				if c.leaf.SerialNumber.Cmp(firstSerial) != 0 {
					t.Errorf("after the fix another certificate is served (serial %v, want %v)", c.leaf.SerialNumber, firstSerial)
				}
			}
			// Whatever is served is ours, valid, with its key.
			c := r.m.cert.Load()
			if _, err := r.m.checkCert(mustRead(t, s.cert), mustRead(t, s.key)); err != nil {
				t.Errorf("storage does not hold a usable certificate after recovery: %v", err)
			}
			if servedSerial(t, r) != c.leaf.SerialNumber.String() {
				t.Error("the WSS listener does not serve the loaded certificate")
			}
			for _, ev := range drain(loaded.Out()) {
				if e := ev.(EvtCertificateLoaded); e.Source == FromStorage && tc.replaced {
					t.Errorf("the damaged certificate was loaded from storage: %+v", e)
				}
			}
			w := warnings(r)
			if len(w) == 0 || !strings.Contains(w[0].text, tc.want) {
				t.Fatalf("warnings do not name the cause (%q):\n%s", tc.want, r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
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

// breakDir makes dir unwritable with a real file-system error: read-only
// permissions, or, for root (to whom permission bits do not apply), a
// regular file where the directory was. It returns the repair.
func breakDir(t *testing.T, dir string) (fix func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		if err := os.Chmod(dir, 0o500); err != nil {
			t.Fatal(err)
		}
		return func() {
			if err := os.Chmod(dir, 0o700); err != nil {
				t.Fatal(err)
			}
		}
	}
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

// TestFaultStorageUnwritable: with a storage directory that cannot be
// written, the first issuance stops before it costs the CA anything (no
// order whose certificate could not be kept), says why, backs off, and
// succeeds once the directory is fixed; at renewal, the certificate in
// use stays in use.
func TestFaultStorageUnwritable(t *testing.T) {
	f := startForge(t, testforge.Config{})
	t.Run("first issuance", func(t *testing.T) {
		leaks := leakCheck(t)
		dir := filepath.Join(t.TempDir(), "store")
		st, err := storage.Dir(dir)
		if err != nil {
			t.Fatal(err)
		}
		fix := breakDir(t, dir)
		before := f.Stats()
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(30 * time.Minute))
		r := startRig(t, f, clk, nil, nil, WithStorage(st))
		clk.WaitParked(t, 30*time.Second)
		checkBackoff(t, clk.Waits(), defaultRetryBase, defaultRetryMax)
		if d := f.Stats().CA - before.CA; d != 0 {
			t.Errorf("%d CA requests while the certificate could not be stored", d)
		}
		w := warnings(r)
		if len(w) == 0 || !strings.Contains(w[len(w)-1].text, "storage") {
			t.Fatalf("no warning names the storage:\n%s", r.logs)
		}
		t.Logf("the operator reads: %s", w[len(w)-1].text)
		pingOverTCP(t, f, r.h)

		fix()
		clk.SetHorizon(clk.Now().Add(defaultRetryMax))
		r.waitLoaded(t)
		r.closeAndCheck(t, leaks)
	})
	t.Run("renewal", func(t *testing.T) {
		leaks := leakCheck(t)
		r, dir, served := startDirRig(t, f)
		fix := breakDir(t, dir)
		r.kick(t) // renew now
		sub, err := r.h.EventBus().Subscribe(new(EvtIssuanceFailed))
		if err != nil {
			t.Fatal(err)
		}
		select {
		case e := <-sub.Out():
			if ev := e.(EvtIssuanceFailed); !ev.Renewal {
				t.Errorf("failure %+v is not a renewal's", ev)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("the renewal did not fail")
		}
		sub.Close()
		if c := r.m.cert.Load(); c != served {
			t.Fatal("the certificate in use was dropped when its renewal could not be stored")
		}
		if servedSerial(t, r) != served.leaf.SerialNumber.String() {
			t.Fatal("the WSS listener no longer serves the certificate in use")
		}
		pingOverTCP(t, f, r.h)
		fix()
		r.kick(t)
		r.waitRenewed(t, served)
		r.closeAndCheck(t, leaks)
	})
}

// TestFaultStorageCorruptAtRenewal: the stored copy of the certificate in
// use is damaged while the host runs. The certificate in use stays in use
// until the renewal, which is not stopped by the damaged copy (certmagic
// renews from the metadata) and overwrites it.
func TestFaultStorageCorruptAtRenewal(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	r, dir, served := startDirRig(t, f)
	s := filesFor(dir, f, f.CAURL, r.h.ID())
	mustWrite(t, s.cert, []byte("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"))

	r.kick(t) // renewal due
	r.waitRenewed(t, served)
	if _, err := r.m.checkCert(mustRead(t, s.cert), mustRead(t, s.key)); err != nil {
		t.Errorf("storage does not hold the renewed certificate: %v", err)
	}
	pingOverTCP(t, f, r.h)
	r.closeAndCheck(t, leaks)
}

// writeLock leaves the lock file certmagic's FileStorage would hold while
// issuing for id, last refreshed at updated, as a process that died
// holding it does.
func writeLock(t *testing.T, dir string, f *testforge.Forge, id peer.ID, updated time.Time) string {
	t.Helper()
	name := certmagic.StorageKeys.Safe("issue_cert_"+certName(id, f.Domain)) + ".lock"
	path := filepath.Join(dir, "locks", name)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, path, fmt.Appendf(nil, `{"created":%q,"updated":%q}`, updated.Add(-time.Minute).Format(time.RFC3339Nano), updated.Format(time.RFC3339Nano)))
	return path
}

// certmagic's FileStorage considers a lock stale once it has not been
// refreshed for twice its 5 s refresh interval.
const lockStaleAfter = 10 * time.Second

// TestFaultStaleLock: a lock file left by a process that crashed while
// issuing does not block issuance for ever: certmagic's FileStorage treats
// it as stale 10 s after its last refresh and takes it over. A lock long
// dead is taken at once; one that was alive a moment ago is waited for
// (not broken early), then taken.
func TestFaultStaleLock(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name string
		age  time.Duration
	}{
		{"long dead", time.Hour},
		{"just died", lockStaleAfter - 2*time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			key := genKey(t, crypto.Ed25519)
			dir := filepath.Join(t.TempDir(), "store")
			st, err := storage.Dir(dir)
			if err != nil {
				t.Fatal(err)
			}
			updated := time.Now().Add(-tc.age)
			lock := writeLock(t, dir, f, idOf(t, key), updated)
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(time.Minute))
			r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st))
			r.waitLoaded(t)
			// A lower bound, not a speed: the lock was not broken while
			// its owner could still have been alive.
			if now := time.Now(); now.Before(updated.Add(lockStaleAfter)) {
				t.Errorf("issued %v before the lock became stale", updated.Add(lockStaleAfter).Sub(now))
			}
			if _, err := os.Stat(lock); err == nil {
				// The file is ours again only if certmagic re-created it;
				// it is removed when issuance ends.
				t.Errorf("the lock file is still there after issuance")
			}
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
	}
}

// crashEnv carries the setup of TestFaultCrashRestart's child process.
const crashEnv = "AUTOTLS_TEST_CRASH_CHILD"

type crashSetup struct {
	Domain, BrokerURL, CAURL, DNSAddr, Dir string
	CARootPEM, Key                         []byte
}

// crashingStorage stores like its Storage until asked to store a site's
// certificate, key or metadata: then the process exits at once, as if it
// had been killed after the CA issued and before anything was saved.
type crashingStorage struct{ certmagic.Storage }

func (s crashingStorage) Store(ctx context.Context, key string, value []byte) error {
	if strings.HasPrefix(key, "certificates/") {
		os.Exit(3)
	}
	return s.Storage.Store(ctx, key, value)
}

// TestFaultCrashChild is the process TestFaultCrashRestart kills: it is
// skipped unless run by it.
func TestFaultCrashChild(t *testing.T) {
	raw := os.Getenv(crashEnv)
	if raw == "" {
		t.Skip("the process TestFaultCrashRestart crashes")
	}
	var s crashSetup
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		t.Fatal(err)
	}
	key, err := crypto.UnmarshalPrivateKey(s.Key)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(s.CARootPEM)
	st, err := storage.Dir(s.Dir)
	if err != nil {
		t.Fatal(err)
	}
	resolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, s.DNSAddr)
	}}
	h, err := libp2p.New(
		libp2p.Identity(key),
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"),
		libp2p.ConnectionGater(testforge.LoopbackGater()),
		Option(WithForgeDomain(s.Domain), WithRegistrationEndpoint(s.BrokerURL), WithCA(s.CAURL, roots),
			WithAllowPrivateAddrs(), WithResolver(resolver), WithStorage(crashingStorage{st}),
			withPollInterval(10*time.Millisecond)),
	)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	time.Sleep(time.Minute) // the crash comes first
	t.Fatal("no crash")
}

// TestFaultCrashRestart: a process is killed between the CA issuing its
// certificate and storing it (a real crash: a child process exits inside
// the storage write, leaving its lock file behind). On restart with the
// same identity and storage, the host gets the certificate the CA issued
// before the crash: the pending order (its key and URL, pending.go) is
// taken up, so there is no new account, order, registration, validation or
// finalization, and so no second certificate counting against the CA's
// limit on the name. The pending order is deleted once the certificate is
// stored.
func TestFaultCrashRestart(t *testing.T) {
	f := startForge(t, testforge.Config{AuthzReusePercent: 100})
	ca := startCAProxy(t, f)
	key := genKey(t, crypto.Ed25519)
	rawKey, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "store")
	setup, err := json.Marshal(crashSetup{Domain: f.Domain, BrokerURL: f.BrokerURL, CAURL: ca.URL, DNSAddr: f.DNSAddr, Dir: dir, CARootPEM: ca.RootPEM, Key: rawKey})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestFaultCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashEnv+"="+string(setup))
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 3 {
		t.Fatalf("the child did not crash where it should (%v):\n%s", err, out)
	}
	id := idOf(t, key)
	s := filesFor(dir, f, ca.URL, id)
	if _, err := os.Stat(s.cert); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a certificate was stored before the crash: %v", err)
	}
	pendingGlob := filepath.Join(dir, "autotls", "acme", "*", "pending", "*.json")
	if pending, _ := filepath.Glob(pendingGlob); len(pending) != 1 {
		t.Fatalf("the crash left %d pending orders, want 1", len(pending))
	}
	crashed := ca.Requests()
	if count(crashed, http.MethodPost, "/certZ/") != 1 {
		t.Fatalf("the child did not download its certificate before crashing")
	}
	lock := filepath.Join(dir, "locks", certmagic.StorageKeys.Safe("issue_cert_"+certName(id, f.Domain))+".lock")
	if _, err := os.Stat(lock); err != nil {
		t.Fatalf("the crash left no lock file: %v", err)
	}
	// The wait for that lock to go stale is TestFaultStaleLock's; here the
	// restart comes later.
	writeLock(t, dir, f, id, time.Now().Add(-time.Minute))

	leaks := leakCheck(t)
	before := f.Stats()
	st, err := storage.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute))
	r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st), WithCA(ca.URL, ca.Roots))
	r.closers = append(r.closers, ca.Close)
	r.waitLoaded(t)
	after := ca.Requests()[len(crashed):]
	got := map[string]int{
		"new accounts":  count(after, http.MethodPost, "/sign-me-up"),
		"new orders":    count(after, http.MethodPost, "/order-plz"),
		"validations":   count(after, http.MethodPost, "/chalZ/"),
		"finalizations": count(after, http.MethodPost, "/finalize-order/"),
		"registrations": f.Stats().Registered - before.Registered,
	}
	if count(crashed, http.MethodPost, "/finalize-order/") != 1 {
		t.Fatalf("the child's finalization is not where the test looks for it")
	}
	want := map[string]int{"new accounts": 0, "new orders": 0, "validations": 0, "finalizations": 0, "registrations": 0}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("restart: %d %s, want %d", got[k], k, w)
		}
	}
	t.Logf("restart after the crash: %v, %d CA requests", got, len(after))
	pending, err := filepath.Glob(pendingGlob)
	if err != nil || len(pending) != 0 {
		t.Errorf("the pending order outlived the stored certificate: %v %v", pending, err)
	}
	pingOverTCP(t, f, r.h)
	r.closeAndCheck(t, leaks)
}

// TestFaultExpiry: a certificate found expired at start is deleted, never
// served, and replaced by a fresh issuance; a certificate whose renewal
// keeps failing stays in use until its last second, and then its WSS
// listeners close, its browser addresses are withdrawn, and
// EvtCertificateExpired is emitted, while the host's other transports go on.
func TestFaultExpiry(t *testing.T) {
	t.Run("expired at start", func(t *testing.T) {
		// The expired certificate comes from a forge issuing for an hour;
		// the host, two hours later by its clock, uses a forge issuing for
		// 90 days.
		old := startForge(t, testforge.Config{CertValidity: time.Hour})
		f := startForge(t, testforge.Config{})
		leaks := leakCheck(t)
		key := genKey(t, crypto.Ed25519)
		id := idOf(t, key)
		certKey := ecdsaKey(t)
		chains, err := old.IssueDirect(t.Context(), id, certKey)
		if err != nil {
			t.Fatal(err)
		}
		st := storage.Memory()
		ik, name := issuerKey(f.CAURL), certName(id, f.Domain)
		for k, v := range map[string][]byte{
			certmagic.StorageKeys.SiteCert(ik, name):       chains[0].ChainPEM,
			certmagic.StorageKeys.SitePrivateKey(ik, name): pemKey(t, certKey),
			certmagic.StorageKeys.SiteMeta(ik, name):       []byte(`{"sans":["` + name + `"],"issuer_data":{}}`),
		} {
			if err := st.Store(t.Context(), k, v); err != nil {
				t.Fatal(err)
			}
		}
		clk := newFakeClock(time.Now().Add(2 * time.Hour).Truncate(time.Second))
		clk.SetHorizon(clk.Now().Add(time.Minute))
		r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st))
		loaded, err := r.h.EventBus().Subscribe(new(EvtCertificateLoaded))
		if err != nil {
			t.Fatal(err)
		}
		defer loaded.Close()
		c := r.waitLoaded(t)
		if !c.leaf.NotAfter.After(clk.Now()) {
			t.Fatalf("serving a certificate that expired at %v", c.leaf.NotAfter)
		}
		for _, e := range drain(loaded.Out()) {
			if ev := e.(EvtCertificateLoaded); ev.Source != Obtained {
				t.Errorf("certificate event %+v, want only a fresh issuance", ev)
			}
		}
		if !strings.Contains(r.logs.String(), "stored certificate expired; deleting it") {
			t.Errorf("the log does not say the stored certificate expired:\n%s", r.logs)
		}
		if len(warnings(r)) != 0 {
			t.Errorf("warnings for an expected expiry:\n%s", r.logs)
		}
		r.closeAndCheck(t, leaks)
	})

	t.Run("renewal failing until expiry", func(t *testing.T) {
		f := startForge(t, testforge.Config{CertValidity: 24 * time.Hour})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		r := startProxiedRig(t, f, ca)
		clk := r.clk
		served := r.waitLoaded(t)
		clk.WaitParked(t, 30*time.Second)
		forgetValidAuthz(t, r, ca)
		notAfter := served.leaf.NotAfter
		expired, err := r.h.EventBus().Subscribe(new(EvtCertificateExpired))
		if err != nil {
			t.Fatal(err)
		}
		defer expired.Close()

		f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
			http.Error(w, "maintenance", http.StatusServiceUnavailable)
			return true
		})
		defer f.SetBrokerFault(nil)
		clk.SetHorizon(notAfter.Add(-time.Minute))
		clk.WaitParked(t, 30*time.Second)
		if r.m.cert.Load() != served || servedSerial(t, r) != served.leaf.SerialNumber.String() {
			t.Fatal("the certificate was dropped before it expired")
		}
		if len(browserAddrs(r.h, f.Domain)) == 0 {
			t.Fatal("browser addresses withdrawn before expiry")
		}
		w := warnings(r)
		if len(w) != 1 {
			t.Fatalf("%d warnings about the failing renewal, want 1:\n%s", len(w), r.logs)
		}
		t.Logf("%d waits from issuance to a minute before expiry; the operator reads: %s", len(clk.Waits()), w[0].text)

		clk.SetHorizon(notAfter.Add(time.Hour))
		select {
		case e := <-expired.Out():
			if ev := e.(EvtCertificateExpired); !ev.NotAfter.Equal(notAfter) {
				t.Errorf("expiry event %+v, want not after %v", ev, notAfter)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("no EvtCertificateExpired")
		}
		if r.m.cert.Load() != nil {
			t.Fatal("an expired certificate is still loaded")
		}
		if a := browserAddrs(r.h, f.Domain); len(a) != 0 {
			t.Errorf("browser addresses still announced after expiry: %v", a)
		}
		for _, a := range r.h.Network().ListenAddresses() {
			if isForgeListenAddr(a, f.Domain) {
				t.Errorf("WSS listener %s still open after expiry", a)
			}
		}
		pingOverTCP(t, f, r.h)
		r.closeAndCheck(t, leaks)
	})
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

// TestFaultBrokerOutageDay: a broker that stays down for a whole day
// (simulated: the fake clock runs the production backoff, one minute
// doubling to six hours) costs a handful of requests, and the log says it
// once. Before the first certificate the broker answers 503 and the health
// gate keeps the CA out of it; at renewal the broker refuses connections
// and each attempt is one ACME order that stops at the registration. The
// counts are logged (go test -run TestFaultBrokerOutageDay -v).
func TestFaultBrokerOutageDay(t *testing.T) {
	const day = 24 * time.Hour
	t.Run("before the first certificate", func(t *testing.T) {
		f := startForge(t, testforge.Config{})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
			http.Error(w, "service unavailable", http.StatusServiceUnavailable)
			return true
		})
		defer f.SetBrokerFault(nil)
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(day))
		r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
		r.closers = append(r.closers, ca.Close)
		clk.WaitParked(t, 30*time.Second)
		st := f.Stats()
		broker, caReqs := st.Health+st.Challenge, len(ca.Requests())
		t.Logf("a day of broker outage before the first certificate: %d broker requests (%d health, %d registration), %d CA requests, %d warning(s)",
			broker, st.Health, st.Challenge, caReqs, len(warnings(r)))
		checkBackoff(t, clk.Waits(), defaultRetryBase, defaultRetryMax)
		if broker > 16 || caReqs != 0 {
			t.Errorf("%d broker and %d CA requests in a day", broker, caReqs)
		}
		if w := warnings(r); len(w) != 1 {
			t.Errorf("%d warnings in a day, want 1:\n%s", len(w), r.logs)
		}
		pingOverTCP(t, f, r.h)
		r.closeAndCheck(t, leaks)
	})

	t.Run("at renewal", func(t *testing.T) {
		f := startForge(t, testforge.Config{})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		tr := http.DefaultTransport.(*http.Transport).Clone()
		counter := &countingTransport{next: tr}
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(time.Minute))
		r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots),
			WithHTTPClient(&http.Client{Transport: counter, Timeout: time.Minute}))
		r.closers = append(r.closers, ca.Close, tr.CloseIdleConnections)
		served := r.waitLoaded(t)
		clk.WaitParked(t, 30*time.Second)
		forgetValidAuthz(t, r, ca)

		// From now on the CA's renewal information (ARI) says: renew now
		// (its window is in the past on the simulated clock, as before a
		// revocation), and poll again in 6 h. A delay in seconds, as a CA
		// sends it: acmez turns it into a wall-clock instant, which the
		// manager measures on the wall clock, so the simulated clock still
		// waits 6 h.
		ca.SetFault(func(w http.ResponseWriter, req *http.Request) bool {
			if !strings.Contains(req.URL.Path, "renewalInfo") {
				return false
			}
			now := clk.Now()
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Retry-After", fmt.Sprint(int((6 * time.Hour).Seconds())))
			fmt.Fprintf(w, `{"suggestedWindow":{"start":%q,"end":%q}}`,
				now.Add(-2*time.Hour).UTC().Format(time.RFC3339), now.Add(-time.Hour).UTC().Format(time.RFC3339))
			return true
		})
		if err := f.BrokerDown(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := f.BrokerUp(); err != nil {
				t.Error(err)
			}
		}()
		brokerBefore, caBefore, warnBefore := counter.n.Load(), len(ca.Requests()), len(warnings(r))
		start := clk.Now()
		clk.SetHorizon(start.Add(day))
		clk.WaitParked(t, 30*time.Second)
		broker := counter.n.Load() - brokerBefore
		caReqs := ca.Requests()[caBefore:]
		warned := warnings(r)[warnBefore:]
		t.Logf("a day of broker outage at renewal: %d broker requests (connections refused), %d CA requests (%d new orders, %d renewal-info), %d warning(s)",
			broker, len(caReqs), count(caReqs, http.MethodPost, "/order-plz"), count(caReqs, http.MethodGet, "/draft-ietf-acme-ari"), len(warned))
		if broker < 5 {
			t.Errorf("%d renewal attempts in a day: the renewal was not due:\n%s", broker, r.logs)
		}
		if broker > 16 || len(caReqs) > 16*8 {
			t.Errorf("%d broker and %d CA requests in a day", broker, len(caReqs))
		}
		if len(warned) != 1 {
			t.Errorf("%d warnings in a day, want 1:\n%s", len(warned), r.logs)
		}
		if r.m.cert.Load() != served || servedSerial(t, r) != served.leaf.SerialNumber.String() {
			t.Errorf("the certificate in use was lost during the outage:\n%s", r.logs)
		}
		pingOverTCP(t, f, r.h)
		r.closeAndCheck(t, leaks)
	})
}
