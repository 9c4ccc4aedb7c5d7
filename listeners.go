package autotls

import (
	"slices"
	"strings"

	ma "github.com/multiformats/go-multiaddr"
)

// listeners are the WSS listen addresses and whether they are open. Only
// onStart and then the run goroutine touch them.
type listeners struct {
	addrs []ma.Multiaddr // to listen on while a certificate is valid
	open  bool
}

// coveredBy reports whether serverName is <label>.<domain>, a name the
// wildcard certificate for *.<domain> covers.
func coveredBy(serverName, domain string) bool {
	sni := strings.ToLower(strings.TrimSuffix(serverName, "."))
	label, ok := strings.CutSuffix(sni, "."+domain)
	return ok && label != "" && !strings.Contains(label, ".")
}

// planListeners decides, once the host's own listeners are open, which WSS
// addresses to listen on: those the user listed, else one on every TCP
// listener's IP and port (the TCP listener is shared, so one forwarded port
// serves both).
func (m *manager) planListeners() {
	if len(m.userWSS) > 0 {
		m.listen.addrs = slices.Clone(m.userWSS)
		return
	}
	m.listen.addrs = nil
	var shared []ma.Multiaddr
	for _, a := range m.sw.ListenAddresses() {
		if w, ok := wssListenAddr(a, m.cfg.forgeDomain); ok {
			if m.userWSSOn(a) {
				shared = append(shared, a) // see announceShared
				continue
			}
			m.listen.addrs = append(m.listen.addrs, w)
		}
	}
	m.sharedWSS.Store(&shared)
}

// openListeners starts the WSS listeners. Opening them is what makes the
// host recompute and push its addresses at once (identify push), rather
// than on its next periodic tick.
func (m *manager) openListeners() {
	if m.listen.open {
		return // a renewal: handshakes pick the new certificate up
	}
	m.listen.open = true
	for _, a := range m.listen.addrs {
		if err := m.sw.Listen(a); err != nil {
			m.log.Warn("could not open a WSS listener", "addr", a, "err", err)
		}
	}
}

// closeListeners stops the WSS listeners; the host's other listeners are
// untouched.
func (m *manager) closeListeners() {
	if !m.listen.open {
		return
	}
	m.listen.open = false
	var open []ma.Multiaddr
	for _, a := range m.sw.ListenAddresses() {
		if isForgeListenAddr(a, m.cfg.forgeDomain) {
			open = append(open, a)
		}
	}
	m.sw.ListenClose(open...)
}
