package downstream

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/autotlstest"
)

// TestBrowserDialable: the app's host gets a certificate from the kit's
// forge, and a peer trusting only the kit's CA dials it over Secure
// WebSockets and pings.
func TestBrowserDialable(t *testing.T) {
	f := autotlstest.New(t)
	h, _ := libp2p.New(append(f.HostOptions(), autotls.Option(f.Options()...))...)
	addr := f.WaitBrowserAddr(t, h)

	p := f.NewPeer(t)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	if err := p.Connect(ctx, peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{addr}}); err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	if res := <-ping.Ping(ctx, p, h.ID()); res.Error != nil {
		t.Fatalf("ping over %s: %v", addr, res.Error)
	}
}

// TestNewNode runs the app's own constructor against the kit.
func TestNewNode(t *testing.T) {
	f := autotlstest.New(t)
	h, err := NewNode(f.HostOptions(), f.Options()...)
	if err != nil {
		t.Fatal(err)
	}
	f.WaitBrowserAddr(t, h)
}
