package autotls

import (
	"context"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	ma "github.com/multiformats/go-multiaddr"
)

// State is what the certificate manager of a host is doing. A waiting
// state says what the first certificate waits for; docs/operating.md
// describes each.
type State string

// The states, in the order of a first issuance and renewal.
const (
	StateWaitingDelay        State = "waiting_registration_delay" // no certificate; [WithRegistrationDelay] runs until NextAttempt
	StateWaitingReachability State = "waiting_reachability"       // AutoNAT has not confirmed a public TCP address to request a certificate for
	StateWaitingBroker       State = "waiting_broker"             // no certificate; the broker's health check has not passed
	StateIssuing             State = "issuing"                    // no certificate; an attempt is under way
	StateValid               State = "valid"                      // a certificate is in use; its renewal is due at NextAttempt
	StateRenewing            State = "renewing"                   // a certificate is in use and due for renewal; an attempt is under way, or failed
	StateExpired             State = "expired"                    // the certificate expired without a replacement; attempts go on
	StateFailed              State = "failed"                     // no certificate; the last attempt failed, the next is at NextAttempt
)

// states lists every state, in the order of a first issuance.
var states = []State{StateWaitingDelay, StateWaitingReachability, StateWaitingBroker, StateIssuing,
	StateValid, StateRenewing, StateExpired, StateFailed}

// Status is what the certificate manager of a host is doing and why. It is
// published as [EvtStatusChanged] (subscribe to follow it); [StatusOf]
// reads the current one.
type Status struct {
	// State is what the manager is doing; Since is when it started to.
	State State
	Since time.Time
	// Names, NotBefore, NotAfter and Source describe the certificate in
	// use, as [EvtCertificateLoaded] does; all are zero when none is.
	Names               []string
	NotBefore, NotAfter time.Time
	Source              CertSource
	// Profile is the ACME profile asked of the CA; empty for its default.
	Profile string
	// LastFailure is the latest failure since a certificate was last
	// loaded (the failure of the latest [EvtIssuanceFailed]); nil if none.
	LastFailure *Failure
	// NextAttempt is when the manager next acts: the end of the
	// registration delay, the next attempt after a failure, or the
	// renewal of a valid certificate. It is zero while the manager waits
	// on something with no time (reachability) or an attempt is under way.
	NextAttempt time.Time
	// Reachability is what AutoNAT has said about the host's TCP
	// addresses, and the gate's conclusion.
	Reachability ReachabilityView
	// BrokerHealthy is the outcome of the latest health check of the
	// broker, made at BrokerChecked (zero before the first). The broker is
	// checked before the first certificate request and after it failed.
	BrokerHealthy bool
	BrokerChecked time.Time
}

// Failure is what holds a certificate back, as the manager judged it: a
// failed attempt to obtain or renew one, a failed health check of the
// broker, or storage failing its check at start (each an
// [EvtIssuanceFailed]).
type Failure struct {
	// Kind sorts failures by what to do about them: broker,
	// broker_unreachable (the broker could not dial the host back, or
	// the host had no public TCP address to give it),
	// txt_not_visible, ca, ca_unreachable, ca_validation, ca_rate_limited,
	// storage, lock, budget (the CA's weekly limit for the name) or other.
	// It is the "kind" of the manager's log line and of the
	// autotls_issuance_attempts_total metric.
	Kind string
	// Message is the operator's sentence, as logged.
	Message string
	// Err is the cause; a *[BrokerError] when the broker refused.
	Err error
	// Time is when it failed; Attempt counts consecutive failures, from 1.
	Time    time.Time
	Attempt int
}

// ReachabilityView is what AutoNAT has told the host about its TCP
// addresses, and what the certificate manager concluded from it.
type ReachabilityView struct {
	// State is the conclusion, as [EvtReachabilityChanged] says it; empty
	// with [WithAllowPrivateAddrs], which skips the check.
	State Reachability
	// Reachable are the TCP addresses AutoNAT v2 confirmed reachable from
	// the internet; Unreachable those it found unreachable.
	Reachable, Unreachable []ma.Multiaddr
	// Public is AutoNAT v1's verdict that the host is publicly reachable.
	Public bool
}

// EvtStatusChanged is emitted on the host's event bus each time the
// [Status] of its certificate manager changes: its state, its
// certificate, a failure, the reachability AutoNAT found, the broker's
// health. It is stateful: a late subscriber receives the current one at
// once.
type EvtStatusChanged struct {
	Status Status
}

// StatusOf returns the current [Status] of the certificate manager of h,
// a host built with [Option]. It reads it from the host's event bus, where
// it is at hand at once, and returns ctx's error if ctx ends before it
// comes (h was not built with [Option]).
func StatusOf(ctx context.Context, h host.Host) (Status, error) {
	sub, err := h.EventBus().Subscribe(new(EvtStatusChanged), eventbus.Name("autotls.StatusOf"))
	if err != nil {
		return Status{}, err
	}
	defer sub.Close()
	var s Status
	select {
	case e := <-sub.Out():
		s = e.(EvtStatusChanged).Status
	case <-ctx.Done():
		return Status{}, ctx.Err()
	}
	for { // any emitted since comes after it
		select {
		case e := <-sub.Out():
			s = e.(EvtStatusChanged).Status
		default:
			return s, nil
		}
	}
}

// String says the status in one line: the state, and what it waits for.
func (s Status) String() string {
	var b strings.Builder
	b.WriteString(string(s.State))
	at := func(t time.Time) string { return t.UTC().Format(time.RFC3339) }
	switch s.State {
	case StateWaitingDelay:
		fmt.Fprintf(&b, ": waiting for the registration delay to pass, until %s", at(s.NextAttempt))
	case StateWaitingReachability:
		b.WriteString(": waiting for AutoNAT to confirm a publicly reachable TCP address")
		switch {
		case len(s.Reachability.Unreachable) > 0:
			fmt.Fprintf(&b, " (unreachable: %v)", s.Reachability.Unreachable)
		case s.Reachability.State == ReachabilityNoPeers:
			b.WriteString(" (no peer connected: AutoNAT has no one to ask)")
		}
	case StateWaitingBroker:
		b.WriteString(": waiting for the broker's health check")
	case StateIssuing:
		b.WriteString(": requesting a certificate")
	case StateValid:
		fmt.Fprintf(&b, ": certificate valid until %s", at(s.NotAfter))
		if !s.NextAttempt.IsZero() {
			fmt.Fprintf(&b, ", renewal at %s", at(s.NextAttempt))
		}
	case StateRenewing:
		fmt.Fprintf(&b, ": renewing the certificate valid until %s", at(s.NotAfter))
	case StateExpired:
		b.WriteString(": the certificate expired without a replacement; browser addresses withdrawn")
	case StateFailed:
		b.WriteString(": no certificate")
	}
	if !s.NotAfter.IsZero() && s.State != StateValid && s.State != StateRenewing {
		fmt.Fprintf(&b, "; the certificate in use is valid until %s", at(s.NotAfter))
	}
	if f := s.LastFailure; f != nil {
		fmt.Fprintf(&b, "; last failure (%s): %s", f.Kind, f.Message)
	}
	if !s.NextAttempt.IsZero() && s.State != StateValid && s.State != StateWaitingDelay {
		fmt.Fprintf(&b, "; next attempt at %s", at(s.NextAttempt))
	}
	return b.String()
}

// clone returns a copy of s that shares no slice with it.
func (s Status) clone() Status {
	s.Names = slices.Clone(s.Names)
	s.Reachability.Reachable = slices.Clone(s.Reachability.Reachable)
	s.Reachability.Unreachable = slices.Clone(s.Reachability.Unreachable)
	if s.LastFailure != nil {
		f := *s.LastFailure
		s.LastFailure = &f
	}
	return s
}

// statusBoard holds a manager's status. The state machine is the set of
// manager methods below; the rest of the manager calls them at its
// transitions.
type statusBoard struct {
	// emitMu orders the emissions, so that the last one on the bus is the
	// current status; mu guards s and is never held while emitting (a slow
	// subscriber must not block a metrics scrape).
	emitMu sync.Mutex
	mu     sync.Mutex
	s      Status
	last   Status // the last one emitted
	lost   bool   // a certificate expired and none replaced it yet; under mu
	em     event.Emitter
}

// attachStatus creates the status emitter on the host's bus, and
// registers the metrics unless they are disabled.
func (m *manager) attachStatus(bus event.Bus) error {
	if m.promReg != nil {
		c, err := registerMetrics(m.promReg)
		if err != nil {
			return err
		}
		m.metrics = c
	}
	em, err := bus.Emitter(new(EvtStatusChanged), eventbus.Stateful)
	if err != nil {
		return fmt.Errorf("creating the status event emitter: %w", err)
	}
	m.status.em = em
	m.status.s.Profile = m.cfg.profile
	return nil
}

// closeStatus takes the host out of the metrics and closes the status
// emitter; the manager's goroutines have ended.
func (m *manager) closeStatus() error {
	m.metrics.remove(m)
	if m.status.em == nil {
		return nil
	}
	return m.status.em.Close()
}

// updateStatus applies f to the status, refreshes the reachability view,
// and emits the result if it changed.
func (m *manager) updateStatus(f func(s *Status)) {
	b := &m.status
	b.emitMu.Lock()
	defer b.emitMu.Unlock()
	reach := m.statusReach()
	b.mu.Lock()
	prev := b.s.State
	f(&b.s)
	if b.s.State != prev {
		b.s.Since = m.clock.Now()
	}
	b.s.Reachability = reach
	snap := b.s.clone()
	b.mu.Unlock()
	if reflect.DeepEqual(snap, b.last) {
		return
	}
	b.last = snap
	if b.em != nil {
		_ = b.em.Emit(EvtStatusChanged{Status: snap.clone()})
	}
}

// setState enters state s, keeping what the status says of the
// certificate and the last failure. It is how a gate says what it waits
// for: m.setState(StateWaitingReachability).
func (m *manager) setState(s State) {
	m.updateStatus(func(st *Status) {
		st.State = s
		if s == StateWaitingReachability {
			st.NextAttempt = time.Time{}
		}
	})
}

// setDelayState: waiting for the registration delay, until t.
func (m *manager) setDelayState(t time.Time) {
	m.updateStatus(func(st *Status) { st.State, st.NextAttempt = StateWaitingDelay, t })
}

// statusAttempt: an attempt to obtain or renew starts.
func (m *manager) statusAttempt() {
	m.updateStatus(func(st *Status) {
		st.NextAttempt = time.Time{}
		if m.cert.Load() != nil {
			st.State = StateRenewing
		} else {
			st.State = StateIssuing
		}
	})
}

// statusScheduled: the run loop waits until next, the renewal of a valid
// certificate or the retry of a failed attempt.
func (m *manager) statusScheduled(next time.Time) {
	m.updateStatus(func(st *Status) { st.NextAttempt = next })
}

// statusServed: c is the certificate in use from now on. A certificate
// loaded ends the failure that came before it.
func (m *manager) statusServed(c *servedCert, src CertSource) {
	m.updateStatus(func(st *Status) {
		m.status.lost = false
		st.State = StateValid
		st.Names = slices.Clone(c.leaf.DNSNames)
		st.NotBefore, st.NotAfter, st.Source = c.leaf.NotBefore, c.leaf.NotAfter, src
		st.LastFailure, st.NextAttempt = nil, renewAt(c.leaf)
	})
}

// statusExpired: the certificate in use expired without a replacement.
func (m *manager) statusExpired() {
	m.updateStatus(func(st *Status) {
		m.status.lost = true
		st.State = StateExpired
		st.Names, st.NotBefore, st.NotAfter, st.Source = nil, time.Time{}, time.Time{}, ""
	})
}

// statusFailed: an attempt, a health check of the broker before the
// first, or the storage check at start failed with f; the next try is at
// next. Without a certificate in use the manager is then failed (expired
// if it lost one), unless the broker's own gate failed: it keeps waiting
// for the broker. With one, the state stays (a failed renewal is still
// renewing).
func (m *manager) statusFailed(f failure, err error, attempt int, now, next time.Time) {
	m.metrics.attempt(string(f.kind))
	m.updateStatus(func(st *Status) {
		st.LastFailure = &Failure{Kind: string(f.kind), Message: f.sentence, Err: err, Time: now, Attempt: attempt}
		st.NextAttempt = next
		switch {
		case !st.NotAfter.IsZero(): // a certificate is in use
		case st.State == StateWaitingBroker && (f.kind == kindBroker || f.kind == kindUnreachable):
		case m.status.lost:
			st.State = StateExpired
		default:
			st.State = StateFailed
		}
	})
}

// statusSucceeded: an attempt ended with a certificate in use (served by
// then).
func (m *manager) statusSucceeded() { m.metrics.attempt("") }

// statusBroker records a health check of the broker.
func (m *manager) statusBroker(err error) {
	now := m.clock.Now()
	m.updateStatus(func(st *Status) { st.BrokerHealthy, st.BrokerChecked = err == nil, now })
}

// brokerHealth checks the broker's health and records the outcome.
func (m *manager) brokerHealth(ctx context.Context) error {
	err := m.broker.health(ctx)
	if ctx.Err() == nil {
		m.statusBroker(err)
	}
	return err
}

// statusReach is what the reachability watcher holds, TCP addresses only.
func (m *manager) statusReach() ReachabilityView {
	m.reach.mu.Lock()
	defer m.reach.mu.Unlock()
	tcp := func(in []ma.Multiaddr) []ma.Multiaddr {
		var out []ma.Multiaddr
		for _, a := range in {
			if thinWaist(a) != nil && !isRelay(a) {
				out = append(out, a)
			}
		}
		return out
	}
	return ReachabilityView{State: m.reach.state, Reachable: tcp(m.reach.reachable), Unreachable: tcp(m.reach.unreachable), Public: m.reach.v1Public}
}

// initialState is the status before the run loop's first step: the first
// gate waitGates will wait on, or valid when a stored certificate is in
// use.
func (m *manager) initialState() {
	if m.cert.Load() != nil {
		return // statusServed said it
	}
	switch {
	case m.cfg.registrationDelay > 0:
		m.setDelayState(m.start.Add(m.cfg.registrationDelay))
	case !m.cfg.allowPrivate && m.reachStatus().State != ReachabilityPublic:
		m.setState(StateWaitingReachability)
	default:
		m.setState(StateWaitingBroker)
	}
}

// reachabilityChanged refreshes the status after an AutoNAT event.
func (m *manager) reachabilityChanged() { m.updateStatus(func(*Status) {}) }

// nextAttempt is what the status calls the next attempt when the run loop
// waits until due: due itself, or the renewal after it if due is an ARI
// poll.
func nextAttempt(due time.Time, poll bool, a *ariState, cur *servedCert) time.Time {
	if !poll || cur == nil {
		return due
	}
	if !a.pick.IsZero() {
		return a.pick
	}
	return renewAt(cur.leaf)
}
