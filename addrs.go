package autotls

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/network"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// reachability is what the host has learnt from AutoNAT about itself.
type reachability struct {
	mu          sync.Mutex
	v1Public    bool
	reachable   []ma.Multiaddr
	unreachable []ma.Multiaddr
	changed     chan struct{} // closed and replaced on every change
}

func (r *reachability) wait() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.changed == nil {
		r.changed = make(chan struct{})
	}
	return r.changed
}

func (r *reachability) update(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f()
	if r.changed != nil {
		close(r.changed)
	}
	r.changed = make(chan struct{})
}

// watchReachability follows AutoNAT v1 and v2 results until the host closes.
func (m *manager) watchReachability(sub event.Subscription) {
	defer m.wg.Done()
	defer sub.Close()
	for {
		select {
		case <-m.ctx.Done():
			return
		case e, ok := <-sub.Out():
			if !ok {
				return
			}
			switch e := e.(type) {
			case event.EvtHostReachableAddrsChanged:
				m.reach.update(func() {
					m.reach.reachable = slices.Clone(e.Reachable)
					m.reach.unreachable = slices.Clone(e.Unreachable)
				})
			case event.EvtLocalReachabilityChanged:
				m.reach.update(func() { m.reach.v1Public = e.Reachability == network.ReachabilityPublic })
			}
			m.reachabilityChanged()
		}
	}
}

// publiclyReachable reports whether a CA-validated, browser-dialable
// address can exist: AutoNAT v2 confirmed a public TCP address, or AutoNAT
// v1 says the host is public and it has a public TCP address.
func (m *manager) publiclyReachable() bool {
	m.reach.mu.Lock()
	reachable, v1 := m.reach.reachable, m.reach.v1Public
	m.reach.mu.Unlock()
	for _, a := range reachable {
		if isPublicTCP(a) {
			return true
		}
	}
	if v1 {
		for _, a := range m.host.Addrs() {
			if isPublicTCP(a) {
				return true
			}
		}
	}
	return false
}

func isPublicTCP(a ma.Multiaddr) bool {
	if isRelay(a) || !manet.IsPublicAddr(a) {
		return false
	}
	_, err := a.ValueForProtocol(ma.P_TCP)
	return err == nil
}

func isRelay(a ma.Multiaddr) bool {
	_, err := a.ValueForProtocol(ma.P_CIRCUIT)
	return err == nil
}

// waitReachable blocks until the host is publicly reachable, re-checking
// on every AutoNAT event and on a backoff from 5 s to 1 min (the host's own
// addresses can change without an event).
func (m *manager) waitReachable(ctx context.Context) bool {
	logged := false
	backoff := 5 * time.Second
	for {
		changed := m.reach.wait()
		if m.publiclyReachable() {
			return true
		}
		if !logged {
			m.setState(StateWaitingReachability)
			m.log.Info("waiting for a publicly reachable TCP address before requesting a certificate (AutoNAT); forward the TCP port or enable UPnP (libp2p.NATPortMap) if this lasts")
			logged = true
		}
		c, stop := m.clock.NewTimer(backoff)
		select {
		case <-ctx.Done():
			stop()
			return false
		case <-changed:
			stop()
		case <-c:
			backoff = min(backoff*2, time.Minute)
		}
	}
}

// brokerAddrs are the addresses the broker dials back: the host's public
// addresses (all of them when private ones are allowed), never relayed ones.
func (m *manager) brokerAddrs() ([]ma.Multiaddr, error) {
	var out []ma.Multiaddr
	for _, a := range m.host.Addrs() {
		if isRelay(a) || isForgeListenAddr(a, m.cfg.forgeDomain) || isHTTPAddr(a) {
			continue
		}
		if !m.cfg.allowPrivate && (!manet.IsPublicAddr(a) || isNAT64(a)) {
			continue
		}
		out = append(out, a)
	}
	if len(out) == 0 {
		if m.cfg.allowPrivate {
			return nil, errors.New("the host has no addresses to offer the broker")
		}
		return nil, errors.New("the host has no public address to offer the broker; it must be reachable from the internet (or use WithAllowPrivateAddrs on a private forge)")
	}
	return out, nil
}

var nat64 = netip.MustParsePrefix("64:ff9b::/96")

func isNAT64(a ma.Multiaddr) bool {
	v, err := a.ValueForProtocol(ma.P_IP6)
	if err != nil {
		return false
	}
	ip, err := netip.ParseAddr(v)
	return err == nil && nat64.Contains(ip)
}

// isUnreachable reports whether AutoNAT v2 found a's TCP part unreachable.
func (m *manager) isUnreachable(a ma.Multiaddr) bool {
	m.reach.mu.Lock()
	defer m.reach.mu.Unlock()
	if len(m.reach.unreachable) == 0 {
		return false
	}
	tcp := thinWaist(a)
	for _, u := range m.reach.unreachable {
		if tcp != nil && thinWaist(u) != nil && thinWaist(u).Equal(tcp) {
			return true
		}
	}
	return false
}

// thinWaist is the /ipX/<ip>/tcp/<port> prefix of a, or nil.
func thinWaist(a ma.Multiaddr) ma.Multiaddr {
	if len(a) < 2 {
		return nil
	}
	switch a[0].Code() {
	case ma.P_IP4, ma.P_IP6:
	default:
		return nil
	}
	if a[1].Code() != ma.P_TCP {
		return nil
	}
	return ma.Multiaddr{a[0], a[1]}
}

// wrapAddrsFactory returns the host's address factory: the user's own
// first, then ours, which turns forge listen addresses into the
// browser-dialable form while a valid certificate is served, and drops them
// otherwise. Relayed and other addresses pass through.
func (m *manager) wrapAddrsFactory(user func([]ma.Multiaddr) []ma.Multiaddr) func([]ma.Multiaddr) []ma.Multiaddr {
	return func(in []ma.Multiaddr) []ma.Multiaddr {
		if user != nil {
			in = user(in)
		}
		return m.rewriteAddrs(in)
	}
}

func (m *manager) rewriteAddrs(in []ma.Multiaddr) []ma.Multiaddr {
	forge := m.cfg.forgeDomain
	cur := m.cert.Load()
	valid := cur != nil && m.clock.Now().Before(cur.leaf.NotAfter)
	out := make([]ma.Multiaddr, 0, len(in))
	for _, a := range in {
		if !isForgeListenAddr(a, forge) {
			out = append(out, a)
			continue
		}
		if !valid || m.id == "" {
			continue
		}
		if !m.cfg.allowPrivate && !manet.IsPublicAddr(a) {
			continue
		}
		if m.isUnreachable(a) {
			continue
		}
		fa, ok := forgeAddr(a, m.id, forge, m.cfg.shortAddrs)
		if !ok || slices.ContainsFunc(out, fa.Equal) {
			continue
		}
		out = append(out, fa)
		out = m.withHTTPAddr(out, fa)
	}
	return out
}
