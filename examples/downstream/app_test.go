package downstream

import (
	"context"
	"io"
	"net/http"
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

// TestNewNode runs the app's own constructor against the kit: the host is
// browser-dialable, and its HTTPS API answers over HTTP/2 by the name on
// its certificate.
func TestNewNode(t *testing.T) {
	f := autotlstest.New(t)
	h, err := NewNode(f.HostOptions(), f.Options()...)
	if err != nil {
		t.Fatal(err)
	}
	f.WaitBrowserAddr(t, h)

	url := autotlstest.HTTPURL(t, f.WaitHTTPAddr(t, h)) + "/id"
	resp, err := f.HTTPClient().Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK || resp.Proto != "HTTP/2.0" || string(body) != h.ID().String() {
		t.Fatalf("GET %s: %s %s %q (%v); want 200 over HTTP/2.0 with the peer ID %s", url, resp.Proto, resp.Status, body, err, h.ID())
	}
}
