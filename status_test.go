package autotls

// Tests of the Status: its states through a real issuance, a renewal, a
// failure and an expiry, as a program reads them from the host's bus.

import (
	"context"
	"errors"
	"net/http"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// statusLog records every EvtStatusChanged of a host from its start.
type statusLog struct{ eventLog[EvtStatusChanged] }

// all returns the statuses so far.
func (l *statusLog) all() []Status {
	var out []Status
	for _, e := range l.eventLog.all() {
		out = append(out, e.Status)
	}
	return out
}

// waitFor waits for a status from the from-th on that satisfies ok, and
// returns it and its index.
func (l *statusLog) waitFor(t testing.TB, from int, what string, ok func(Status) bool) (Status, int) {
	t.Helper()
	i, e := l.eventLog.waitFor(t, from, "status "+what, func(e EvtStatusChanged) bool { return ok(e.Status) })
	return e.Status, i
}

// waitState waits for state s from the from-th status on.
func (l *statusLog) waitState(t testing.TB, from int, s State) (Status, int) {
	t.Helper()
	return l.waitFor(t, from, string(s), func(st Status) bool { return st.State == s })
}

// caughtUp waits until the log holds s, read by a late subscriber: the
// subscriber from the start sees it too, and has seen all before it.
func (l *statusLog) caughtUp(t testing.TB, s Status) {
	t.Helper()
	l.waitFor(t, 0, "read late", func(x Status) bool { return reflect.DeepEqual(x, s) })
}

// states returns the states from the from-th status on, each once per
// stay.
func (l *statusLog) states(from int) []State {
	var out []State
	for _, s := range l.all()[from:] {
		if len(out) == 0 || out[len(out)-1] != s.State {
			out = append(out, s.State)
		}
	}
	return out
}

// servedLeafNotAfter returns the NotAfter of the certificate a WSS
// handshake with the rig's host gets.
func servedNotAfter(t *testing.T, h host.Host, f *testforge.Forge) time.Time {
	t.Helper()
	addr := waitBrowserAddr(t, h, f.Domain, "/ip4/127.0.0.1/")
	sni := "127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + f.Domain
	st, err := tlsHandshake(tcpHostPort(t, addr), sni, f.IssuerRoots)
	if err != nil {
		t.Fatal(err)
	}
	return st.PeerCertificates[0].NotAfter
}

// lateStatus subscribes after the fact and returns the status the bus
// hands over at once, checking that StatusOf reads the same.
func lateStatus(t *testing.T, h host.Host) Status {
	t.Helper()
	sub, err := h.EventBus().Subscribe(new(EvtStatusChanged))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	var s Status
	select {
	case e := <-sub.Out():
		s = e.(EvtStatusChanged).Status
	case <-time.After(5 * time.Second):
		t.Fatal("a late subscriber got no status")
	}
	got, err := StatusOf(t.Context(), h)
	if err != nil || !reflect.DeepEqual(got, s) {
		t.Errorf("StatusOf = %+v, %v; the late subscriber got %+v", got, err, s)
	}
	return s
}

// TestStatusIssuanceAndRenewal follows the status of a host through a
// first issuance behind a registration delay (waiting for the delay, for
// the broker, issuing, valid), then a renewal (renewing, valid), each
// certificate the one a WSS handshake gets, and reads it as a late
// subscriber and through StatusOf.
func TestStatusIssuanceAndRenewal(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	log := &statusLog{}
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(2 * time.Hour))
	noARI := func(m *manager) { m.ariFirstPoll = 8 * time.Hour } // parks the first ARI poll past the horizon
	r := startRig(t, f, clk, []libp2p.Option{log.option(t)}, noARI,
		WithStorage(storage.Memory()), WithRegistrationDelay(time.Hour))
	r.closers = append(r.closers, func() { log.stop() })

	valid, at := log.waitState(t, 0, StateValid)
	if got, want := log.states(0), []State{StateWaitingDelay, StateWaitingBroker, StateIssuing, StateValid}; !slices.Equal(got[:min(len(got), len(want))], want) {
		t.Errorf("states of a first issuance %v, want %v", got, want)
	}
	first := log.all()[0]
	if want := r.m.start.Add(time.Hour); !first.NextAttempt.Equal(want) || !strings.Contains(first.String(), "registration delay") {
		t.Errorf("waiting for the delay: %q, want the next attempt at %v", first, want)
	}
	notAfter := servedNotAfter(t, r.h, f)
	leaf := r.m.cert.Load().leaf
	if !valid.NotAfter.Equal(notAfter) || !valid.NotBefore.Equal(leaf.NotBefore) || valid.Source != Obtained ||
		!slices.Equal(valid.Names, []string{certName(r.h.ID(), f.Domain)}) {
		t.Errorf("valid status %+v; the served certificate is valid until %v", valid, notAfter)
	}
	if valid.LastFailure != nil || !valid.BrokerHealthy || valid.BrokerChecked.IsZero() {
		t.Errorf("valid status after a clean issuance: failure %v, broker healthy %v at %v", valid.LastFailure, valid.BrokerHealthy, valid.BrokerChecked)
	}
	if !valid.NextAttempt.Equal(renewAt(leaf)) {
		t.Errorf("valid: next attempt %v, want the renewal at %v", valid.NextAttempt, renewAt(leaf))
	}
	clk.WaitParked(t, 30*time.Second)
	late := lateStatus(t, r.h)
	if late.State != StateValid || !late.NotAfter.Equal(notAfter) {
		t.Errorf("a late subscriber reads %q, want valid until %v", late, notAfter)
	}
	t.Logf("a program reads: %s", late)

	// Renewal.
	r.kick(t)
	renewed, _ := log.waitFor(t, at+1, "valid after a renewal", func(s Status) bool { return s.State == StateValid && s.Source == Renewed })
	if got, want := log.states(at), []State{StateValid, StateRenewing, StateValid}; !slices.Equal(got, want) {
		t.Errorf("states of a renewal %v, want %v", got, want)
	}
	if n := servedNotAfter(t, r.h, f); !renewed.NotAfter.Equal(n) || r.m.cert.Load().leaf.Equal(leaf) ||
		servedSerial(t, r) != r.m.cert.Load().leaf.SerialNumber.String() {
		t.Errorf("after renewal the status says valid until %v; the new certificate served is valid until %v", renewed.NotAfter, n)
	}
	r.closeAndCheck(t, leaks)
	// A host without autotls has no status.
	plain, err := libp2p.New(f.HostOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	if s, err := StatusOf(ctx, plain); err == nil {
		t.Errorf("StatusOf reads %q from a host without autotls", s)
	}
}

// TestStatusFailure: a broker failing its health check keeps the host
// waiting for the broker; one failing registrations leaves it failed.
// Either way the status names the failure as EvtIssuanceFailed and the log
// do, and the next attempt; once the broker mends, the host is valid and
// the failure gone.
func TestStatusFailure(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name    string
		path    string
		want    State
		healthy bool
	}{
		{name: "health", path: healthPath, want: StateWaitingBroker, healthy: false},
		{name: "register", path: registerPath, want: StateFailed, healthy: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			var down atomic.Bool
			down.Store(true)
			f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
				if !down.Load() || r.URL.Path != tc.path {
					return false
				}
				http.Error(w, "maintenance", http.StatusServiceUnavailable)
				return true
			})
			defer f.SetBrokerFault(nil)
			log := &statusLog{}
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(10 * time.Minute))
			r := startRig(t, f, clk, []libp2p.Option{log.option(t)}, nil, WithStorage(storage.Memory()))
			r.closers = append(r.closers, func() { log.stop() })
			clk.WaitParked(t, 30*time.Second)

			// Parked until the next attempt: the status is the one a
			// program reads until then.
			s := lateStatus(t, r.h)
			if s.LastFailure == nil {
				t.Fatalf("status %+v after failures, want the last one", s)
			}
			ev := r.fails.nth(t, s.LastFailure.Attempt)
			fl := classify(ev.Err, clk.Now())
			var be *BrokerError
			if s.State != tc.want || s.LastFailure.Kind != string(kindBroker) || s.LastFailure.Message != fl.sentence ||
				!errors.As(s.LastFailure.Err, &be) || be.StatusCode != http.StatusServiceUnavailable {
				t.Errorf("status %+v (failure %+v), want %s after a broker 503", s, s.LastFailure, tc.want)
			}
			if !s.NextAttempt.Equal(ev.NextRetry) {
				t.Errorf("next attempt %v, EvtIssuanceFailed says %v", s.NextAttempt, ev.NextRetry)
			}
			if s.BrokerHealthy != tc.healthy || s.BrokerChecked.IsZero() {
				t.Errorf("broker healthy %v (checked %v), want %v", s.BrokerHealthy, s.BrokerChecked, tc.healthy)
			}
			if !strings.Contains(r.logs.String(), s.LastFailure.Message) {
				t.Errorf("the failure %q is not what the log says:\n%s", s.LastFailure.Message, r.logs)
			}
			log.caughtUp(t, s)
			t.Logf("a program reads: %s", s)

			down.Store(false)
			clk.SetHorizon(clk.Now().Add(retryCap))
			valid, _ := log.waitState(t, 0, StateValid)
			if valid.LastFailure != nil || !valid.BrokerHealthy {
				t.Errorf("valid after the broker mended, but failure %+v, broker healthy %v", valid.LastFailure, valid.BrokerHealthy)
			}
			if st := log.states(0); st[len(st)-1] != StateValid || !slices.Contains(st, StateIssuing) {
				t.Errorf("states %v", st)
			}
			r.closeAndCheck(t, leaks)
		})
	}
}

// TestStatusExpiry: a certificate from storage is valid; its renewal
// failing (broker down) until it expires leaves the host renewing, with
// the failure, while the certificate is valid; expired once it lapses, and
// after each failed attempt since (never merely failed); and valid again
// once the broker mends. As in TestFaultLapse, the lapsing certificate,
// valid for a day, comes from a second forge: the host's clock runs a day
// and a half ahead of Pebble's.
func TestStatusExpiry(t *testing.T) {
	const validity = 24 * time.Hour
	short := startForge(t, testforge.Config{CertValidity: validity})
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	key := genKey(t, crypto.Ed25519)
	st := storage.Memory()
	leaf := storeIssued(t, short, idOf(t, key), st, issuerKey(f.CAURL))
	notAfter := leaf.NotAfter
	var down atomic.Bool
	down.Store(true)
	f.SetBrokerFault(func(w http.ResponseWriter, _ *http.Request) bool {
		if !down.Load() {
			return false
		}
		http.Error(w, "maintenance", http.StatusServiceUnavailable)
		return true
	})
	defer f.SetBrokerFault(nil)

	log := &statusLog{}
	clk := newClockAtNow()
	clk.SetHorizon(notAfter.Add(-time.Minute))
	noARI := func(m *manager) { m.ariFirstPoll = 4 * validity } // another CA's certificate
	r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key), log.option(t)}, noARI, WithStorage(st))
	r.closers = append(r.closers, func() { log.stop() })
	clk.WaitParked(t, 30*time.Second)
	first := log.all()[0]
	if first.State != StateValid || first.Source != FromStorage || !first.NotAfter.Equal(notAfter) || !first.NextAttempt.Equal(renewAt(leaf)) {
		t.Errorf("first status %+v, want valid from storage until %v, renewal at %v", first, notAfter, renewAt(leaf))
	}
	s := lateStatus(t, r.h)
	if s.State != StateRenewing || s.LastFailure == nil || s.LastFailure.Kind != string(kindBroker) || !s.NotAfter.Equal(notAfter) {
		t.Fatalf("a minute before expiry with the broker down: %+v, want renewing the certificate valid until %v, with the broker's failure", s, notAfter)
	}
	log.caughtUp(t, s)
	if got := log.states(0); !slices.Equal(got, []State{StateValid, StateRenewing}) {
		t.Errorf("states before expiry %v, want valid, renewing", got)
	}
	t.Logf("a minute before expiry: %s", s)

	clk.SetHorizon(notAfter.Add(12 * time.Hour))
	_, expAt := log.waitState(t, 0, StateExpired)
	clk.WaitParked(t, 30*time.Second)
	s = lateStatus(t, r.h)
	if s.State != StateExpired || s.LastFailure == nil || !s.LastFailure.Time.After(notAfter) || !s.NotAfter.IsZero() || s.Names != nil {
		t.Errorf("after failed attempts since the expiry: %+v, want expired, no certificate, the latest failure", s)
	}
	log.caughtUp(t, s)
	if got := log.states(expAt); !slices.Contains(got, StateIssuing) || slices.Contains(got, StateFailed) {
		t.Errorf("states since the expiry %v, want attempts (issuing) ending expired, never failed", got)
	}
	t.Logf("after the expiry: %s", s)

	down.Store(false)
	clk.SetHorizon(clk.Now().Add(retryCap))
	valid, _ := log.waitState(t, expAt, StateValid)
	if n := servedNotAfter(t, r.h, f); !valid.NotAfter.Equal(n) || valid.LastFailure != nil || valid.Source != Obtained {
		t.Errorf("valid again: %+v; the served certificate is valid until %v", valid, n)
	}
	r.closeAndCheck(t, leaks)
}

// TestStatusReachability: without WithAllowPrivateAddrs the host waits
// for reachability, and the status shows what AutoNAT found: a TCP address
// found unreachable, then one confirmed, which opens the gate. AutoNAT
// cannot run on loopback, so the test emits the AutoNAT v2 result on the
// host's bus, as the host's address manager does (the network namespace
// tests run AutoNAT for real).
func TestStatusReachability(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	log := &statusLog{}
	opts := append(f.HostOptions(), log.option(t), Option(
		WithForgeDomain(f.Domain), WithRegistrationEndpoint(f.BrokerURL), WithCA(f.CAURL, f.CARoots),
		WithResolver(f.Resolver()), WithStorage(storage.Memory()), WithLogger((&logCapture{}).logger()),
	))
	h, err := libp2p.New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	s := lateStatus(t, h)
	if s.State != StateWaitingReachability || len(s.Reachability.Reachable)+len(s.Reachability.Unreachable) != 0 {
		t.Fatalf("a fresh host on loopback: %+v, want waiting for reachability with nothing found", s)
	}
	em, err := h.EventBus().Emitter(new(event.EvtHostReachableAddrsChanged))
	if err != nil {
		t.Fatal(err)
	}
	// A public address (documentation ranges are not public to
	// go-multiaddr); it is only ever data in an event, never dialed.
	public := ma.StringCast("/ip4/11.0.0.7/tcp/4001")
	quic := ma.StringCast("/ip4/11.0.0.7/udp/4001/quic-v1")
	if err := em.Emit(event.EvtHostReachableAddrsChanged{Reachable: []ma.Multiaddr{quic}, Unreachable: []ma.Multiaddr{public}}); err != nil {
		t.Fatal(err)
	}
	s, at := log.waitFor(t, 0, "with an unreachable address", func(s Status) bool { return len(s.Reachability.Unreachable) > 0 })
	if s.State != StateWaitingReachability || len(s.Reachability.Reachable) != 0 || !s.Reachability.Unreachable[0].Equal(public) {
		t.Errorf("after AutoNAT found %s unreachable (and a QUIC address reachable): %+v", public, s)
	}
	if !strings.Contains(s.String(), public.String()) {
		t.Errorf("the status line %q does not name the unreachable address", s)
	}
	t.Logf("a program reads: %s", s)
	if err := em.Emit(event.EvtHostReachableAddrsChanged{Reachable: []ma.Multiaddr{public, quic}}); err != nil {
		t.Fatal(err)
	}
	s, _ = log.waitState(t, at, StateWaitingBroker)
	if len(s.Reachability.Reachable) != 1 || !s.Reachability.Reachable[0].Equal(public) || len(s.Reachability.Unreachable) != 0 {
		t.Errorf("once AutoNAT confirmed %s: %+v", public, s)
	}
	// The loopback host has no public address of its own to give the
	// broker: the attempt fails, which the status says.
	s, _ = log.waitState(t, at, StateFailed)
	t.Logf("then: %s", s)
	em.Close()
	if err := h.Close(); err != nil {
		t.Error(err)
	}
	log.stop()
	leaks()
}

// nth waits for the n-th failure event and returns it.
func (l *failureLog) nth(t testing.TB, n int) EvtIssuanceFailed {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		l.mu.Lock()
		evs, more := l.evs, l.more
		l.mu.Unlock()
		for _, e := range evs {
			if e.Attempt == n {
				return e
			}
		}
		select {
		case <-more:
		case <-timeout:
			t.Fatalf("no EvtIssuanceFailed for attempt %d within 30 s", n)
		}
	}
}

// TestStatusString: the one line says the state and what it waits for.
func TestStatusString(t *testing.T) {
	at := time.Date(2026, 11, 26, 16, 0, 0, 0, time.UTC)
	fail := &Failure{Kind: "broker", Message: "the broker is unreachable; retrying", Attempt: 2}
	reach := ReachabilityView{Unreachable: []ma.Multiaddr{ma.StringCast("/ip4/11.0.0.7/tcp/4001")}}
	for _, tc := range []struct {
		s    Status
		want string
	}{
		{Status{State: StateWaitingDelay, NextAttempt: at},
			"waiting_registration_delay: waiting for the registration delay to pass, until 2026-11-26T16:00:00Z"},
		{Status{State: StateWaitingReachability, Reachability: reach},
			"waiting_reachability: waiting for AutoNAT to confirm a publicly reachable TCP address (unreachable: [/ip4/11.0.0.7/tcp/4001])"},
		{Status{State: StateWaitingReachability, Reachability: ReachabilityView{State: ReachabilityNoPeers}},
			"waiting_reachability: waiting for AutoNAT to confirm a publicly reachable TCP address (no peer connected: AutoNAT has no one to ask)"},
		{Status{State: StateWaitingReachability, NotAfter: at},
			"waiting_reachability: waiting for AutoNAT to confirm a publicly reachable TCP address; the certificate in use is valid until 2026-11-26T16:00:00Z"},
		{Status{State: StateWaitingBroker, LastFailure: fail, NextAttempt: at},
			"waiting_broker: waiting for the broker's health check; last failure (broker): the broker is unreachable; retrying; next attempt at 2026-11-26T16:00:00Z"},
		{Status{State: StateIssuing}, "issuing: requesting a certificate"},
		{Status{State: StateValid, NotAfter: at, NextAttempt: at.Add(-time.Hour)},
			"valid: certificate valid until 2026-11-26T16:00:00Z, renewal at 2026-11-26T15:00:00Z"},
		{Status{State: StateRenewing, NotAfter: at, LastFailure: fail, NextAttempt: at.Add(-time.Hour)},
			"renewing: renewing the certificate valid until 2026-11-26T16:00:00Z; last failure (broker): the broker is unreachable; retrying; next attempt at 2026-11-26T15:00:00Z"},
		{Status{State: StateExpired, LastFailure: fail, NextAttempt: at},
			"expired: the certificate expired without a replacement; browser addresses withdrawn; last failure (broker): the broker is unreachable; retrying; next attempt at 2026-11-26T16:00:00Z"},
		{Status{State: StateFailed, LastFailure: fail, NextAttempt: at},
			"failed: no certificate; last failure (broker): the broker is unreachable; retrying; next attempt at 2026-11-26T16:00:00Z"},
	} {
		if got := tc.s.String(); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.s.State, got, tc.want)
		}
	}
}

// TestStatusStorageAtStart: storage that cannot be written, found by the
// check at start, leaves the host failed with the storage's failure (not
// waiting for a gate it has not reached), until the storage is fixed.
func TestStatusStorageAtStart(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	dir := filepath.Join(t.TempDir(), "store")
	st, err := storage.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	fix := breakDir(t, dir)
	log := &statusLog{}
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(30 * time.Minute))
	r := startRig(t, f, clk, []libp2p.Option{log.option(t)}, nil, WithStorage(st))
	r.closers = append(r.closers, func() { log.stop() })
	clk.WaitParked(t, 30*time.Second)
	s := lateStatus(t, r.h)
	if s.State != StateFailed || s.LastFailure == nil || s.LastFailure.Kind != string(kindStorage) || !s.BrokerChecked.IsZero() {
		t.Errorf("with unwritable storage: %+v, want failed on storage before the broker is asked", s)
	}
	t.Logf("a program reads: %s", s)
	fix()
	clk.SetHorizon(clk.Now().Add(retryCap))
	log.waitState(t, 0, StateValid)
	log.caughtUp(t, lateStatus(t, r.h))
	if got, want := log.states(0), []State{StateWaitingBroker, StateFailed, StateWaitingBroker, StateIssuing, StateValid}; !slices.Equal(got, want) {
		t.Errorf("states %v, want %v", got, want)
	}
	r.closeAndCheck(t, leaks)
}
