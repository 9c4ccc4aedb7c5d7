package autotls

import (
	"net/netip"
	"slices"

	ma "github.com/multiformats/go-multiaddr"
)

func isRelay(a ma.Multiaddr) bool {
	_, err := a.ValueForProtocol(ma.P_CIRCUIT)
	return err == nil
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
		if !m.cfg.allowPrivate && !m.cfg.public(a) {
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
	}
	return out
}
