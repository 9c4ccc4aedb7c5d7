package testforge

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"testing"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	"github.com/libp2p/go-libp2p/p2p/transport/websocket"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

type connAddrs struct{ local, remote ma.Multiaddr }

func (c connAddrs) LocalMultiaddr() ma.Multiaddr  { return c.local }
func (c connAddrs) RemoteMultiaddr() ma.Multiaddr { return c.remote }

func TestLoopbackGater(t *testing.T) {
	g := LoopbackGater()
	local := ma.StringCast("/ip4/127.0.0.1/tcp/4001")
	tests := []struct {
		addr string
		want bool
	}{
		{"/ip4/127.0.0.1/tcp/4001", true},
		{"/ip4/127.1.2.3/udp/4001/quic-v1", true},
		{"/ip6/::1/tcp/4001", true},
		{"/ip4/127.0.0.1/tcp/4001/tls/sni/1-2-3-4.example/ws", true},
		{"/ip4/192.0.2.1/tcp/4001", false},
		{"/ip4/10.0.0.1/tcp/4001", false},
		{"/ip6/2001:db8::1/tcp/4001", false},
		{"/ip4/0.0.0.0/tcp/4001", false},
		{"/dns4/localhost/tcp/4001", false}, // unresolved names are not loopback
	}
	for _, tt := range tests {
		a := ma.StringCast(tt.addr)
		if got := g.InterceptAddrDial("", a); got != tt.want {
			t.Errorf("InterceptAddrDial(%s) = %v, want %v", tt.addr, got, tt.want)
		}
		if got := g.InterceptAccept(connAddrs{local, a}); got != tt.want {
			t.Errorf("InterceptAccept(from %s) = %v, want %v", tt.addr, got, tt.want)
		}
	}
	if !g.InterceptPeerDial("") {
		t.Error("InterceptPeerDial refused")
	}
}

func TestHostOptionsListenOnLoopbackOnly(t *testing.T) {
	f := startForge(t, Config{})
	key, _ := seededKey(t, 2)
	h := newHost(t, f, key)
	var tcp, quic bool
	for _, a := range h.Addrs() {
		if !manet.IsIPLoopback(a) {
			t.Errorf("non-loopback address %s", a)
		}
		_, errTCP := a.ValueForProtocol(ma.P_TCP)
		_, errQUIC := a.ValueForProtocol(ma.P_QUIC_V1)
		tcp = tcp || errTCP == nil
		quic = quic || errQUIC == nil
	}
	if !tcp || !quic {
		t.Fatalf("addresses %v, want TCP and QUIC", h.Addrs())
	}
}

// A dialer resolves a forge name through the forge's DNS and reaches a host.
func TestDialerResolvesThroughForge(t *testing.T) {
	f := startForge(t, Config{})
	key, id := seededKey(t, 2)
	h := newHost(t, f, key)
	var port string
	for _, a := range h.Addrs() {
		if p, err := a.ValueForProtocol(ma.P_TCP); err == nil {
			port = p
		}
	}
	d, err := libp2p.New(f.DialerOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	if len(d.Addrs()) != 0 {
		t.Errorf("dialer listens on %v", d.Addrs())
	}

	before := f.Stats().DNS
	addr := ma.StringCast("/dns4/127-0-0-1." + PeerLabel(id) + "." + f.Domain + "/tcp/" + port)
	if err := d.Connect(t.Context(), peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{addr}}); err != nil {
		t.Fatalf("Connect via %s: %v", addr, err)
	}
	if f.Stats().DNS == before {
		t.Fatal("the forge name was not resolved through the forge's DNS")
	}
}

// End to end: a certificate from the forge's CA serves a WSS listener that a
// dialer built with DialerOptions trusts, and a ping crosses.
func TestDialerTrustsIssuedCertOverWSS(t *testing.T) {
	f := startForge(t, Config{})
	key, id := seededKey(t, 2)

	certKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chains, err := f.IssueDirect(t.Context(), id, certKey)
	if err != nil {
		t.Fatal(err)
	}
	var cert tls.Certificate
	for _, c := range parseChain(t, chains[0]) {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	cert.PrivateKey = certKey

	listener, err := libp2p.New(
		libp2p.Identity(key),
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0/tls/sni/*."+f.Domain+"/ws"),
		libp2p.Transport(websocket.New, websocket.WithTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}})),
		libp2p.ConnectionGater(LoopbackGater()),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = listener.Close() })
	if len(listener.Addrs()) == 0 {
		t.Fatal("WSS listener has no address")
	}
	port, err := listener.Addrs()[0].ValueForProtocol(ma.P_TCP)
	if err != nil {
		t.Fatal(err)
	}

	sniAddr := ma.StringCast("/ip4/127.0.0.1/tcp/" + port + "/tls/sni/127-0-0-1." + PeerLabel(id) + "." + f.Domain + "/ws")
	t.Run("system roots refuse", func(t *testing.T) {
		plain, err := libp2p.New(libp2p.NoListenAddrs, libp2p.ConnectionGater(LoopbackGater()))
		if err != nil {
			t.Fatal(err)
		}
		defer plain.Close()
		if err := plain.Connect(t.Context(), peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{sniAddr}}); err == nil {
			t.Fatal("a dialer without the issuing root connected")
		}
	})

	d, err := libp2p.New(f.DialerOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	for _, addr := range []string{
		"/ip4/127.0.0.1/tcp/" + port + "/tls/sni/127-0-0-1." + PeerLabel(id) + "." + f.Domain + "/ws",
		"/dns4/127-0-0-1." + PeerLabel(id) + "." + f.Domain + "/tcp/" + port + "/tls/ws",
	} {
		t.Run(addr, func(t *testing.T) {
			for _, c := range d.Network().ConnsToPeer(id) {
				_ = c.Close()
			}
			if err := d.Connect(t.Context(), peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{ma.StringCast(addr)}}); err != nil {
				t.Fatalf("Connect: %v", err)
			}
			res := <-ping.Ping(t.Context(), d, id)
			if res.Error != nil {
				t.Fatalf("ping: %v", res.Error)
			}
		})
	}
}
