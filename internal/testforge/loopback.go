package testforge

import (
	"crypto/tls"
	"net/netip"
	"slices"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/connmgr"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	libp2pwebrtc "github.com/libp2p/go-libp2p/p2p/transport/webrtc"
	"github.com/libp2p/go-libp2p/p2p/transport/websocket"
	webtransport "github.com/libp2p/go-libp2p/p2p/transport/webtransport"
	ma "github.com/multiformats/go-multiaddr"
	madns "github.com/multiformats/go-multiaddr-dns"
	manet "github.com/multiformats/go-multiaddr/net"
)

// LoopbackGater returns a connection gater that refuses every dial to, and
// every connection from, a non-loopback address.
func LoopbackGater() connmgr.ConnectionGater { return loopbackGater{} }

type loopbackGater struct{}

func (loopbackGater) InterceptPeerDial(peer.ID) bool { return true }

func (loopbackGater) InterceptAddrDial(_ peer.ID, a ma.Multiaddr) bool {
	return manet.IsIPLoopback(a)
}

func (loopbackGater) InterceptAccept(c network.ConnMultiaddrs) bool {
	return manet.IsIPLoopback(c.RemoteMultiaddr())
}

func (loopbackGater) InterceptSecured(network.Direction, peer.ID, network.ConnMultiaddrs) bool {
	return true
}

func (loopbackGater) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) {
	return true, 0
}

// HostOptions returns the options that confine a libp2p host to loopback
// and to the forge's DNS: listen on /ip4/127.0.0.1/tcp/0 and
// /ip4/127.0.0.1/udp/0/quic-v1 only, [LoopbackGater], and a multiaddr DNS
// resolver that queries the forge. NAT port mapping and the relay service
// stay off (libp2p's defaults); transports are libp2p's defaults.
//
// They combine with other options, but not with another
// libp2p.ConnectionGater or libp2p.MultiaddrResolver (libp2p refuses two
// gaters; the last resolver wins), and listen addresses given elsewhere are
// added to these.
func (f *Forge) HostOptions() []libp2p.Option {
	return []libp2p.Option{
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"),
		libp2p.ConnectionGater(LoopbackGater()),
		libp2p.MultiaddrResolver(f.multiaddrResolver()),
	}
}

// DialerOptions returns the options for a host that only dials, e.g. to
// reach a WSS listener serving a forge certificate: no listen addresses,
// [LoopbackGater], the forge's DNS, and libp2p's default transports except
// that the WebSocket transport trusts [Forge.IssuerRoots] only.
//
// They set the transports: do not combine them with libp2p.Transport or
// libp2p.DefaultTransports.
func (f *Forge) DialerOptions() []libp2p.Option {
	return []libp2p.Option{
		libp2p.NoListenAddrs,
		libp2p.ConnectionGater(LoopbackGater()),
		libp2p.MultiaddrResolver(f.multiaddrResolver()),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Transport(quic.NewTransport),
		libp2p.Transport(websocket.New, websocket.WithTLSClientConfig(f.issuerTLSConfig())),
		libp2p.Transport(webtransport.New),
		libp2p.Transport(libp2pwebrtc.New),
	}
}

// PrefixGater returns a connection gater that refuses every dial to, and
// every connection from, an address outside loopback and prefixes.
func PrefixGater(prefixes ...netip.Prefix) connmgr.ConnectionGater {
	return prefixGater{slices.Clone(prefixes)}
}

type prefixGater struct{ prefixes []netip.Prefix }

func (g prefixGater) allowed(a ma.Multiaddr) bool {
	if manet.IsIPLoopback(a) {
		return true
	}
	ip, err := manet.ToIP(a)
	if err != nil {
		return false
	}
	addr, ok := netip.AddrFromSlice(ip)
	if !ok {
		return false
	}
	addr = addr.Unmap()
	for _, p := range g.prefixes {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

func (prefixGater) InterceptPeerDial(peer.ID) bool { return true }

func (g prefixGater) InterceptAddrDial(_ peer.ID, a ma.Multiaddr) bool { return g.allowed(a) }

func (g prefixGater) InterceptAccept(c network.ConnMultiaddrs) bool {
	return g.allowed(c.RemoteMultiaddr())
}

func (prefixGater) InterceptSecured(network.Direction, peer.ID, network.ConnMultiaddrs) bool {
	return true
}

func (prefixGater) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) {
	return true, 0
}

// dialBackOptions are the options of the broker's throwaway probe host:
// like the public broker's (no listen addresses, no relay, TLS and Noise,
// yamux), with TCP, QUIC and WebSocket, confined to loopback (and
// [Config.DialBackPrefixes]) and the forge.
func (f *Forge) dialBackOptions() []libp2p.Option {
	gater := LoopbackGater()
	if len(f.cfg.DialBackPrefixes) > 0 {
		gater = PrefixGater(f.cfg.DialBackPrefixes...)
	}
	return []libp2p.Option{
		libp2p.NoListenAddrs,
		libp2p.DisableRelay(),
		libp2p.DisableMetrics(),
		libp2p.ConnectionGater(gater),
		libp2p.MultiaddrResolver(f.multiaddrResolver()),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Transport(quic.NewTransport),
		libp2p.Transport(websocket.New, websocket.WithTLSClientConfig(f.issuerTLSConfig())),
		libp2p.DefaultSecurity,
		libp2p.DefaultMuxers,
	}
}

func (f *Forge) issuerTLSConfig() *tls.Config {
	return &tls.Config{RootCAs: f.IssuerRoots}
}

func (f *Forge) multiaddrResolver() network.MultiaddrDNSResolver {
	r, err := madns.NewResolver(madns.WithDefaultResolver(f.Resolver()))
	if err != nil {
		// NewResolver only fails on invalid options; ours are valid.
		panic(err)
	}
	return swarm.ResolverFromMaDNS{Resolver: r}
}
