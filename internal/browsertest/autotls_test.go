package browsertest_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/internal/browsertest"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestBrowserDialsAutoTLSHost is the whole point of the library: a host
// built with autotls.Option gets its certificate from the in-process forge
// (Pebble, broker, DNS), and headless Chromium running js-libp2p dials its
// announced address over Secure WebSockets and pings it, trusting only the
// forge's root, with the forge's names mapped to loopback. Without the
// root, the same dial must fail on certificate trust.
func TestBrowserDialsAutoTLSHost(t *testing.T) {
	browsertest.Require(t)
	f, err := testforge.Start(testforge.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	for _, tc := range []struct {
		name  string
		short bool
	}{{"long form", false}, {"short form", true}} {
		t.Run(tc.name, func(t *testing.T) {
			opts := []autotls.Opt{
				autotls.WithForgeDomain(f.Domain),
				autotls.WithRegistrationEndpoint(f.BrokerURL),
				autotls.WithCA(f.CAURL, f.CARoots),
				autotls.WithResolver(f.Resolver()),
				autotls.WithStorage(storage.Memory()),
				autotls.WithAllowPrivateAddrs(),
			}
			prefix := "/ip4/127.0.0.1/"
			if tc.short {
				opts = append(opts, autotls.WithShortAddrs())
				prefix = "/dns4/"
			}
			h, err := libp2p.New(append(f.HostOptions(), autotls.Option(opts...))...)
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			addr := browserAddr(t, h, prefix)
			target := addr.String() + "/p2p/" + h.ID().String()

			res, err := browsertest.Dial(context.Background(), browsertest.Options{
				Multiaddr:    target,
				TrustRootPEM: f.IssuerRootPEM,
				HostRules:    "MAP *." + f.Domain + " 127.0.0.1",
				Timeout:      browsertest.DefaultTimeout,
			})
			if err != nil {
				t.Fatalf("browser: %v", err)
			}
			if !res.OK || len(res.RTTs) == 0 || res.RemotePeer != h.ID().String() {
				t.Fatalf("browser dial of %s: %+v; want pings from %s", target, res, h.ID())
			}
			t.Logf("browser pinged %s: RTTs %v ms", target, res.RTTs)

			if tc.short {
				return
			}
			res, err = browsertest.Dial(context.Background(), browsertest.Options{
				Multiaddr: target,
				HostRules: "MAP *." + f.Domain + " 127.0.0.1",
				Timeout:   browsertest.DefaultTimeout,
			})
			if err != nil {
				t.Fatalf("browser (untrusted root): %v", err)
			}
			if res.OK || !strings.Contains(res.Error, "ERR_CERT_AUTHORITY_INVALID") {
				t.Fatalf("with the forge's root untrusted the dial gave %+v; want a certificate authority error", res)
			}
		})
	}
}

// browserAddr waits for the host's certificate and returns its announced
// browser address starting with prefix.
func browserAddr(t *testing.T, h host.Host, prefix string) ma.Multiaddr {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for _, a := range h.Addrs() {
			if _, err := a.ValueForProtocol(ma.P_TLS); err == nil && strings.HasPrefix(a.String(), prefix) {
				return a
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no %s browser address; have %v", prefix, h.Addrs())
	return nil
}
