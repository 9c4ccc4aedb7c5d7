package autotls

// The reachability gate: a certificate is requested, first or renewed,
// only while the host is reachable from the internet over TCP, the one
// transport a browser's Secure WebSocket uses. The broker's dial-back and
// the CA's order cost requests and rate limits; a certificate for a port
// nobody can reach is of no use.

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	ma "github.com/multiformats/go-multiaddr"
)

// noPeersAfter is how long the host may have no peer at all before the
// gate says so: AutoNAT asks connected peers to dial back, and a host that
// connects to nobody waits for ever.
const noPeersAfter = time.Minute

// reachability is what the host has learnt from AutoNAT about itself, and
// the gate's conclusion. The watcher goroutine writes it; the run loop,
// the address factory and status reports read it.
type reachability struct {
	// Set by configure, before the host starts.
	v2Client bool // the host runs an AutoNAT v2 client
	forced   bool // libp2p.ForceReachabilityPublic: v1 says public by fiat

	mu          sync.Mutex
	v1Public    bool
	reachable   []ma.Multiaddr // AutoNAT v2: confirmed reachable
	unreachable []ma.Multiaddr // AutoNAT v2: confirmed unreachable
	noPeers     bool           // no peer connected for noPeersAfter

	state   Reachability   // the conclusion; "" until the watcher starts
	addrs   []ma.Multiaddr // confirmed or unreachable TCP addresses
	since   time.Time      // when state was entered
	waiting bool           // a certificate request waits for state public
	changed chan struct{}  // closed and replaced on every change

	// warned are the states already warned about since the state was
	// last public (the watcher's): a host that flaps between no peers
	// and one peer is told once.
	warned map[Reachability]bool
}

// reachView is the gate's state as status reports show it.
type reachView struct {
	State Reachability
	// Addrs are the TCP addresses confirmed reachable, or found
	// unreachable.
	Addrs []ma.Multiaddr
	// Since is when State was entered.
	Since time.Time
	// Waiting is true while a certificate request, first or renewal, is
	// held back until State is public.
	Waiting bool
	// Checked is false with WithAllowPrivateAddrs: there is no gate.
	Checked bool
}

// reachStatus returns the gate's current state.
func (m *manager) reachStatus() reachView {
	r := &m.reach
	r.mu.Lock()
	defer r.mu.Unlock()
	return reachView{State: r.state, Addrs: slices.Clone(r.addrs), Since: r.since, Waiting: r.waiting, Checked: !m.cfg.allowPrivate}
}

// wait returns the gate's state and a channel closed at its next change.
func (r *reachability) wait() (Reachability, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.changed == nil {
		r.changed = make(chan struct{})
	}
	return r.state, r.changed
}

// notifyLocked wakes the waiters; r.mu is held.
func (r *reachability) notifyLocked() {
	if r.changed != nil {
		close(r.changed)
	}
	r.changed = make(chan struct{})
}

// configureGate takes what the gate needs from the final libp2p
// configuration: whether AutoNAT v2 runs, and whether reachability is
// forced public.
func (m *manager) configureGate(cfg *libp2p.Config) {
	m.reach.v2Client = cfg.EnableAutoNATv2
	f := cfg.AutoNATConfig.ForceReachability
	m.reach.forced = f != nil && *f == network.ReachabilityPublic
}

// startGate subscribes to AutoNAT's results and starts the watcher. With
// private addresses allowed there is no gate, and only AutoNAT v2's
// unreachable addresses are followed (the address factory drops them).
func (m *manager) startGate() error {
	types := []any{new(event.EvtHostReachableAddrsChanged), new(event.EvtLocalReachabilityChanged)}
	if !m.cfg.allowPrivate {
		types = append(types, new(event.EvtLocalAddressesUpdated), new(event.EvtPeerConnectednessChanged))
		if !m.reach.v2Client {
			m.log.Warn("AutoNAT v2 is turned off: AutoNAT v1 cannot tell TCP from QUIC reachability, so a certificate is only requested when the host's public addresses are all TCP, or with libp2p.ForceReachabilityPublic; turn on libp2p.EnableAutoNATv2")
		}
	}
	sub, err := m.host.EventBus().Subscribe(types, eventbus.Name("autotls"), eventbus.BufSize(64))
	if err != nil {
		return fmt.Errorf("autotls: subscribing to reachability events: %w", err)
	}
	m.wg.Add(1)
	go m.watchReachability(sub)
	return nil
}

// watchReachability follows AutoNAT v1 and v2, the host's addresses and
// its peers until the host closes, and keeps the gate's state.
func (m *manager) watchReachability(sub event.Subscription) {
	defer m.wg.Done()
	defer sub.Close()
	gate := !m.cfg.allowPrivate
	// zeroSince is when the host last had no peer at all; zero while it
	// has some.
	var zeroSince time.Time
	var timer <-chan time.Time
	stop := func() bool { return false }
	var armed time.Time
	defer func() { stop() }()
	if gate {
		if len(m.host.Network().Peers()) == 0 {
			zeroSince = m.start
		}
	}
	for {
		if gate {
			m.reassess()
			m.reachabilityChanged()
			want := time.Time{}
			if !zeroSince.IsZero() && !m.noPeers() {
				want = zeroSince.Add(noPeersAfter)
			}
			if !want.Equal(armed) {
				stop()
				timer, stop, armed = nil, func() bool { return false }, want
				if !want.IsZero() {
					timer, stop = m.clock.NewTimer(want.Sub(m.clock.Now()))
				}
			}
		}
		select {
		case <-m.ctx.Done():
			return
		case <-timer:
			timer, stop, armed = nil, func() bool { return false }, time.Time{}
			m.setNoPeers(true)
		case e, ok := <-sub.Out():
			if !ok {
				return
			}
			switch e := e.(type) {
			case event.EvtHostReachableAddrsChanged:
				m.reach.mu.Lock()
				m.reach.reachable = slices.Clone(e.Reachable)
				m.reach.unreachable = slices.Clone(e.Unreachable)
				m.reach.mu.Unlock()
			case event.EvtLocalReachabilityChanged:
				m.reach.mu.Lock()
				m.reach.v1Public = e.Reachability == network.ReachabilityPublic
				m.reach.mu.Unlock()
			case event.EvtPeerConnectednessChanged:
				has := len(m.host.Network().Peers()) > 0
				switch {
				case has && !zeroSince.IsZero():
					zeroSince = time.Time{}
					m.setNoPeers(false)
				case !has && zeroSince.IsZero():
					zeroSince = m.clock.Now()
				default:
					continue // nothing the gate looks at changed
				}
			}
		}
	}
}

func (m *manager) noPeers() bool {
	m.reach.mu.Lock()
	defer m.reach.mu.Unlock()
	return m.reach.noPeers
}

func (m *manager) setNoPeers(v bool) {
	m.reach.mu.Lock()
	defer m.reach.mu.Unlock()
	m.reach.noPeers = v
}

// gateInput is what the gate decides from.
type gateInput struct {
	v1Public, forced       bool
	reachable, unreachable []ma.Multiaddr // AutoNAT v2's verdicts
	hostAddrs              []ma.Multiaddr // h.Addrs()
	noPeers                bool
	public                 func(ma.Multiaddr) bool
}

func (m *manager) gateInput() gateInput {
	r := &m.reach
	r.mu.Lock()
	in := gateInput{
		v1Public: r.v1Public, forced: r.forced,
		reachable: r.reachable, unreachable: r.unreachable,
		noPeers: r.noPeers, public: m.cfg.public,
	}
	r.mu.Unlock()
	// Not under r.mu: the address factory takes it.
	in.hostAddrs = m.host.Addrs()
	return in
}

// assess is the gate's rule. The host is public over TCP when
//
//   - AutoNAT v2 confirmed one of its public TCP addresses (v2 dials each
//     address it is asked about, over that address's transport); or
//   - AutoNAT v1 says the host is public and that verdict can only be
//     about TCP (forced by libp2p.ForceReachabilityPublic, or no public
//     address of the host runs over UDP: v1 dials any of them, and an
//     open QUIC port would earn it), and the host has a public TCP
//     address that AutoNAT v2 has not found unreachable.
//
// It returns the state, the TCP addresses it concerns (for public: the
// ones the broker is to dial back) and, for public, which AutoNAT said so.
func assess(in gateInput) (Reachability, []ma.Multiaddr, string) {
	tcp := func(a ma.Multiaddr) bool { return isThinTCP(a) && in.public(a) && !isNAT64(a) }
	var confirmed, unreachable []ma.Multiaddr
	for _, a := range in.reachable {
		if tcp(a) && !slices.ContainsFunc(confirmed, a.Equal) {
			confirmed = append(confirmed, a)
		}
	}
	if len(confirmed) > 0 {
		return ReachabilityPublic, confirmed, "AutoNAT v2"
	}
	for _, a := range in.unreachable {
		if tcp(a) && !slices.ContainsFunc(unreachable, a.Equal) {
			unreachable = append(unreachable, a)
		}
	}
	if in.v1Public && (in.forced || !anyOverUDP(in.hostAddrs, in.public)) {
		var cand []ma.Multiaddr
		for _, a := range in.hostAddrs {
			if tcp(a) && !slices.ContainsFunc(unreachable, a.Equal) && !slices.ContainsFunc(cand, a.Equal) {
				cand = append(cand, a)
			}
		}
		if len(cand) > 0 {
			if in.forced {
				return ReachabilityPublic, cand, "libp2p.ForceReachabilityPublic"
			}
			return ReachabilityPublic, cand, "AutoNAT v1"
		}
	}
	if len(unreachable) > 0 {
		return ReachabilityUnreachable, unreachable, ""
	}
	if in.noPeers {
		return ReachabilityNoPeers, nil, ""
	}
	return ReachabilityUnknown, nil, ""
}

// isThinTCP reports whether a is exactly /ip4|ip6/<ip>/tcp/<port>: plain
// TCP, what the broker's dial-back may only use to prove what a browser
// needs.
func isThinTCP(a ma.Multiaddr) bool {
	return len(a) == 2 && thinWaist(a) != nil
}

// anyOverUDP reports whether one of addrs is a public direct address over
// UDP (QUIC, WebTransport, WebRTC).
func anyOverUDP(addrs []ma.Multiaddr, public func(ma.Multiaddr) bool) bool {
	for _, a := range addrs {
		if isRelay(a) || !public(a) {
			continue
		}
		if _, err := a.ValueForProtocol(ma.P_UDP); err == nil {
			return true
		}
	}
	return false
}

// reassess recomputes the gate's state; on a change it wakes the waiters,
// logs the change once and emits [EvtReachabilityChanged]. Only the
// watcher calls it.
func (m *manager) reassess() {
	st, addrs, by := assess(m.gateInput())
	r := &m.reach
	r.mu.Lock()
	prev := r.state
	if st == prev && slices.EqualFunc(addrs, r.addrs, ma.Multiaddr.Equal) {
		r.mu.Unlock()
		return
	}
	r.state, r.addrs = st, addrs
	if st != prev {
		r.since = m.clock.Now()
	}
	r.notifyLocked()
	r.mu.Unlock()
	if st != prev {
		m.logReachability(prev, st, addrs, by)
	}
	_ = m.emReach.Emit(EvtReachabilityChanged{Reachability: st, Addrs: slices.Clone(addrs)})
}

// logReachability says a change of state: once per change, never per
// check. A warning said since the state was last public is repeated at
// debug level only.
func (m *manager) logReachability(prev, st Reachability, addrs []ma.Multiaddr, by string) {
	r := &m.reach
	warn := slog.LevelWarn
	if r.warned[st] {
		warn = slog.LevelDebug
	}
	switch st {
	case ReachabilityPublic:
		clear(r.warned)
		m.log.Info("public TCP reachability confirmed", "addrs", addrs, "by", by)
	case ReachabilityUnreachable:
		m.log.Log(m.ctx, warn, "AutoNAT cannot reach this host's TCP address from the internet; no certificate is requested until it can: check the port forward on the router (or enable libp2p.NATPortMap) and that the firewall lets this TCP port in", "addrs", addrs)
	case ReachabilityNoPeers:
		m.log.Log(m.ctx, warn, fmt.Sprintf("no peer connected for %v: AutoNAT needs peers to confirm a public TCP address; connect to bootstrap peers, or on a server known to be public use libp2p.ForceReachabilityPublic", noPeersAfter))
	default:
		level := slog.LevelDebug
		if prev == ReachabilityPublic {
			level = slog.LevelInfo
		}
		m.log.Log(m.ctx, level, "TCP reachability not confirmed (any more); waiting for AutoNAT", "was", string(prev))
		return
	}
	if st != ReachabilityPublic {
		if r.warned == nil {
			r.warned = map[Reachability]bool{}
		}
		r.warned[st] = true
	}
}

// waitReachable blocks until the gate's state is public; with private
// addresses allowed it returns at once. While it waits, a certificate in
// use that lapses is withdrawn (it stays served until then). It logs why
// it waits once, and returns false when ctx ends.
func (m *manager) waitReachable(ctx context.Context) bool {
	if m.cfg.allowPrivate {
		return true
	}
	logged := false
	defer m.setWaiting(false)
	for {
		st, changed := m.reach.wait()
		if st == ReachabilityPublic {
			return true
		}
		m.setWaiting(true)
		cur := m.cert.Load()
		if !logged {
			logged = true
			m.setState(StateWaitingReachability)
			if cur != nil {
				m.log.Warn("certificate renewal waits until AutoNAT confirms a public TCP address again; the certificate in use is served until it expires", "reachability", string(st), "not_after", cur.leaf.NotAfter.Format(time.RFC3339))
			} else {
				m.log.Info("waiting for AutoNAT to confirm a public TCP address before requesting a certificate", "reachability", string(st))
			}
		}
		var lapse <-chan time.Time
		stop := func() bool { return false }
		if cur != nil {
			now := m.clock.Now()
			if !now.Before(cur.leaf.NotAfter) {
				m.expire(cur)
				continue
			}
			lapse, stop = m.clock.NewTimer(cur.leaf.NotAfter.Sub(now))
		}
		select {
		case <-ctx.Done():
			stop()
			return false
		case <-changed:
			stop()
		case <-lapse:
		}
	}
}

func (m *manager) setWaiting(v bool) {
	m.reach.mu.Lock()
	defer m.reach.mu.Unlock()
	m.reach.waiting = v
}

// brokerAddrs are the addresses the broker dials back: plain TCP
// addresses only, so that a successful dial-back proves what a browser
// needs (a QUIC address could succeed where TCP is closed). Those AutoNAT
// v2 confirmed, if any; otherwise the host's public TCP addresses that v2
// has not found unreachable (all its TCP addresses when private ones are
// allowed). Never relayed or NAT64 addresses.
func (m *manager) brokerAddrs() ([]ma.Multiaddr, error) {
	if m.cfg.allowPrivate {
		var out []ma.Multiaddr
		for _, a := range m.host.Addrs() {
			if isThinTCP(a) {
				out = append(out, a)
			}
		}
		if len(out) == 0 {
			return nil, errNoBrokerAddrs("the host has no TCP address to offer the broker")
		}
		return out, nil
	}
	in := m.gateInput()
	if st, addrs, _ := assess(in); st == ReachabilityPublic {
		return addrs, nil
	}
	// Not confirmed (the gate's state moved on since it opened): the
	// public TCP addresses AutoNAT v2 has not found unreachable.
	in.v1Public, in.forced, in.reachable = true, true, nil
	if st, addrs, _ := assess(in); st == ReachabilityPublic {
		return addrs, nil
	}
	return nil, errNoBrokerAddrs("the host has no public TCP address to offer the broker; it must be reachable from the internet over TCP (or use WithAllowPrivateAddrs on a private forge)")
}

// brokerRequestAddrs is the solver's source of addresses: brokerAddrs,
// with the one line an operator sees before the broker is asked.
func (m *manager) brokerRequestAddrs() ([]ma.Multiaddr, error) {
	addrs, err := m.brokerAddrs()
	if err == nil {
		m.log.Info("asking the broker to dial this host back and publish the DNS-01 challenge", "addrs", addrs)
	}
	return addrs, err
}

// errNoBrokerAddrs: the host had no address for the broker to dial back
// when the challenge was due (its reachability changed since the gate
// opened). classify says it as the host's reachability, not the CA's.
type errNoBrokerAddrs string

func (e errNoBrokerAddrs) Error() string { return string(e) }
