package autotlstest_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/autotlstest"
	"github.com/p2ptls/autotls/storage"
)

// newHost builds a host under test pointed at f, with extra autotls
// options after the kit's.
func newHost(t *testing.T, f *autotlstest.Forge, libp2pOpts []libp2p.Option, opts ...autotls.Opt) host.Host {
	t.Helper()
	all := append(f.HostOptions(), libp2pOpts...)
	all = append(all, autotls.Option(append(f.Options(), opts...)...))
	h, err := libp2p.New(all...)
	if err != nil {
		t.Fatalf("libp2p.New: %v", err)
	}
	return h
}

// pingOverWSS dials addr from a peer trusting only the forge's CA and
// pings across; the connection must be the WebSocket one.
func pingOverWSS(t *testing.T, f *autotlstest.Forge, h host.Host, addr ma.Multiaddr) {
	t.Helper()
	p := f.NewPeer(t)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	if err := p.Connect(ctx, peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{addr}}); err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	conns := p.Network().ConnsToPeer(h.ID())
	if len(conns) != 1 || !strings.Contains(conns[0].RemoteMultiaddr().String(), "/ws") {
		t.Fatalf("connections %v, want one over WebSocket", conns)
	}
	if res := <-ping.Ping(ctx, p, h.ID()); res.Error != nil {
		t.Fatalf("ping over %s: %v", addr, res.Error)
	}
}

func genKey(t *testing.T) crypto.PrivKey {
	t.Helper()
	k, _, err := crypto.GenerateKeyPair(crypto.Ed25519, -1)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestHappyPath is the kit's promise in three lines: a host gets a
// certificate, announces a browser address, and a peer trusting only the
// kit's CA dials it over WSS and pings.
func TestHappyPath(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	h, err := libp2p.New(append(f.HostOptions(), autotls.Option(f.Options()...))...)
	if err != nil {
		t.Fatal(err)
	}
	addr := f.WaitBrowserAddr(t, h)

	if !strings.Contains(addr.String(), "/tls/sni/127-0-0-1.") || !strings.HasSuffix(addr.String(), "."+f.Domain()+"/ws") {
		t.Fatalf("browser address %s", addr)
	}
	pingOverWSS(t, f, h, addr)

	s := f.Stats()
	if s.Broker == 0 || s.Registered != 1 || s.CA == 0 || s.DNS == 0 || s.TXT == 0 {
		t.Errorf("stats %+v: want broker, CA and DNS requests, one registration", s)
	}

	pemBytes, err := os.ReadFile(f.RootPEMFile(t))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(pemBytes)
	if block == nil || block.Type != "CERTIFICATE" {
		t.Fatalf("root file holds no certificate: %q", pemBytes)
	}
	root, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := root.Verify(x509.VerifyOptions{Roots: f.Roots()}); err != nil {
		t.Errorf("the root file's certificate is not in Roots: %v", err)
	}
	if f.Resolver() == nil {
		t.Error("no resolver")
	}
}

// TestOptionsStorageOverride: a WithStorage after the kit's options wins,
// so a restarted host serves its stored certificate with no CA request.
func TestOptionsStorageOverride(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	key, store := genKey(t), storage.Memory()
	h := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, autotls.WithStorage(store))
	f.WaitBrowserAddr(t, h)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	before := f.Stats()
	h = newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, autotls.WithStorage(store))
	addr := f.WaitBrowserAddr(t, h)
	if after := f.Stats(); after.CA != before.CA || after.Broker != before.Broker {
		t.Errorf("restart with the stored certificate cost requests: before %+v, after %+v", before, after)
	}
	pingOverWSS(t, f, h, addr)
}

// TestShortAddrs: the /dnsX/.../tls/ws form is a browser address too, and
// the peer resolves it through the forge's DNS.
func TestShortAddrs(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	h := newHost(t, f, nil, autotls.WithShortAddrs())
	addr := f.WaitBrowserAddr(t, h)
	if !strings.HasPrefix(addr.String(), "/dns4/127-0-0-1.") {
		t.Fatalf("browser address %s, want the short /dns4/ form", addr)
	}
	p := f.NewPeer(t)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	if err := p.Connect(ctx, peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{addr}}); err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	if res := <-ping.Ping(ctx, p, h.ID()); res.Error != nil {
		t.Fatal(res.Error)
	}
}
