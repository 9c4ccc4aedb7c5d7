package browsertest_test

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/autotlstest"
	"github.com/p2ptls/autotls/internal/browsertest"
)

// TestBrowserDialsAutoTLSHost is the whole point of the library: a host
// built with autotls.Option gets its certificate from the test kit's forge
// (Pebble, broker, DNS), and headless Chromium running js-libp2p dials its
// announced address over Secure WebSockets and pings it, trusting only the
// forge's root, with the forge's names mapped to loopback. Without the
// root, the same dial must fail on certificate trust.
func TestBrowserDialsAutoTLSHost(t *testing.T) {
	browsertest.Require(t)
	f := autotlstest.New(t)
	rootPEM, err := os.ReadFile(f.RootPEMFile(t))
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name  string
		short bool
	}{{"long form", false}, {"short form", true}} {
		t.Run(tc.name, func(t *testing.T) {
			opts := f.Options()
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
			addr := f.WaitBrowserAddr(t, h)
			if !strings.HasPrefix(addr.String(), prefix) {
				t.Fatalf("browser address %s, want the %s form", addr, prefix)
			}
			target := addr.String() + "/p2p/" + h.ID().String()

			res, err := browsertest.Dial(context.Background(), browsertest.Options{
				Multiaddr:    target,
				TrustRootPEM: rootPEM,
				HostRules:    "MAP *." + f.Domain() + " 127.0.0.1",
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
				HostRules: "MAP *." + f.Domain() + " 127.0.0.1",
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
