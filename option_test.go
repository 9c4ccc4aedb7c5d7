package autotls

import (
	"context"
	"errors"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ws "github.com/libp2p/go-libp2p/p2p/transport/websocket"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/goleak"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// marker is an address a user's factory adds, to prove it ran.
var marker = ma.StringCast("/ip4/127.0.0.1/tcp/1/p2p-circuit")

func userFactory(in []ma.Multiaddr) []ma.Multiaddr { return append(in, marker) }

// TestOptionComposition builds hosts with autotls.Option combined with the
// user's own transports, listen addresses, address factory and shared TCP
// listener, with Option first and last. Each must issue, announce and carry
// a ping over WSS, and keep what the user configured.
func TestOptionComposition(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	type combo struct {
		name       string
		user       []libp2p.Option
		listen     bool // the user gives listen addresses (else the forge's loopback ones are added)
		wantMarker bool
		check      func(t *testing.T, h host.Host)
	}
	hasTransports := func(codes ...int) func(*testing.T, host.Host) {
		return func(t *testing.T, h host.Host) {
			sw := h.Network().(*swarm.Swarm)
			for _, c := range codes {
				var probe ma.Multiaddr
				switch c {
				case ma.P_TCP:
					probe = ma.StringCast("/ip4/127.0.0.1/tcp/1")
				case ma.P_QUIC_V1:
					probe = ma.StringCast("/ip4/127.0.0.1/udp/1/quic-v1")
				}
				if sw.TransportForDialing(probe) == nil {
					t.Errorf("no transport for %s", probe)
				}
			}
		}
	}
	combos := []combo{
		{name: "alone", check: hasTransports(ma.P_TCP, ma.P_QUIC_V1)},
		{name: "own transports", user: []libp2p.Option{libp2p.Transport(tcp.NewTCPTransport), libp2p.Transport(quic.NewTransport)}, check: hasTransports(ma.P_TCP, ma.P_QUIC_V1)},
		{name: "own websocket transport", user: []libp2p.Option{libp2p.Transport(tcp.NewTCPTransport), libp2p.Transport(ws.New)}, check: hasTransports(ma.P_TCP)},
		{name: "addrs factory", user: []libp2p.Option{libp2p.AddrsFactory(userFactory)}, wantMarker: true},
		{name: "share tcp listener", user: []libp2p.Option{libp2p.ShareTCPListener()}},
		{name: "own forge listen addr", listen: true, user: []libp2p.Option{libp2p.ListenAddrStrings(
			"/ip4/127.0.0.1/tcp/0",
			"/ip4/127.0.0.1/tcp/0/tls/sni/*."+f.Domain+"/ws",
		)}},
		{name: "everything", listen: true, wantMarker: true, user: []libp2p.Option{
			libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"),
			libp2p.Transport(tcp.NewTCPTransport), libp2p.Transport(quic.NewTransport), libp2p.Transport(ws.New),
			libp2p.AddrsFactory(userFactory), libp2p.ShareTCPListener(),
		}, check: hasTransports(ma.P_TCP, ma.P_QUIC_V1)},
	}
	for _, c := range combos {
		for _, first := range []bool{true, false} {
			name := c.name + "/option last"
			if first {
				name = c.name + "/option first"
			}
			t.Run(name, func(t *testing.T) {
				base := []libp2p.Option{libp2p.ConnectionGater(testforge.LoopbackGater())}
				if !c.listen {
					base = f.HostOptions()
				}
				auto := Option(forgeOpts(f, WithStorage(storage.Memory()))...)
				opts := append(base, c.user...)
				if first {
					opts = append([]libp2p.Option{auto}, opts...)
				} else {
					opts = append(opts, auto)
				}
				h, err := libp2p.New(opts...)
				if err != nil {
					t.Fatalf("libp2p.New: %v", err)
				}
				defer h.Close()
				waitCert(t, h, 30*time.Second)
				addr := waitBrowserAddr(t, h, f.Domain, "/ip4/127.0.0.1/")
				dialAndPing(t, f, h.ID(), addr)
				if got := slices.ContainsFunc(h.Addrs(), marker.Equal); got != c.wantMarker {
					t.Errorf("user factory's address present = %v, want %v (%v)", got, c.wantMarker, h.Addrs())
				}
				if c.check != nil {
					c.check(t, h)
				}
			})
		}
	}
}

// TestOptionErrors: bad configuration fails at libp2p.New, naming autotls
// and what to change.
func TestOptionErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opts []libp2p.Option
		want string
	}{
		{"bad forge domain", []libp2p.Option{Option(WithForgeDomain("not a domain"), WithStorage(storage.Memory()))}, "WithForgeDomain"},
		{"custom forge without broker", []libp2p.Option{Option(WithForgeDomain("example.net"), WithStorage(storage.Memory()))}, "WithRegistrationEndpoint"},
		{"bad endpoint", []libp2p.Option{Option(WithRegistrationEndpoint("registration.example.net"), WithStorage(storage.Memory()))}, "absolute http"},
		{"bad CA", []libp2p.Option{Option(WithCA("http://ca.example/dir", nil), WithStorage(storage.Memory()))}, "https URL"},
		{"nil storage", []libp2p.Option{Option(WithStorage(nil))}, "WithStorage(nil)"},
		{"private network", []libp2p.Option{libp2p.PrivateNetwork(pnet.PSK(make([]byte, 32))), Option(WithStorage(storage.Memory()))}, "PrivateNetwork"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := append([]libp2p.Option{libp2p.NoListenAddrs}, tc.opts...)
			h, err := libp2p.New(opts...)
			if err == nil {
				h.Close()
				t.Fatal("libp2p.New succeeded")
			}
			if !strings.Contains(err.Error(), "autotls") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not name autotls and %q", err, tc.want)
			}
		})
	}
}

// TestShortAddrs: WithShortAddrs announces /dns4/<ip>.<peer>.<forge>/tcp/N/tls/ws,
// which a dialer resolves through the forge's DNS to loopback.
func TestShortAddrs(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	h := newHost(t, f, nil, WithStorage(storage.Memory()), WithShortAddrs())
	waitCert(t, h, 30*time.Second)
	addr := waitBrowserAddr(t, h, f.Domain, "/dns4/")
	want := "/dns4/127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + f.Domain + "/tcp/"
	if !strings.HasPrefix(addr.String(), want) || !strings.HasSuffix(addr.String(), "/tls/ws") {
		t.Fatalf("short address %s, want %s…/tls/ws", addr, want)
	}
	dialAndPing(t, f, h.ID(), addr)
}

// TestIPv6 dials the long /ip6/::1 form, where the machine has ::1.
func TestIPv6(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	h, err := libp2p.New(
		libp2p.ListenAddrStrings("/ip6/::1/tcp/0"),
		libp2p.ConnectionGater(testforge.LoopbackGater()),
		Option(forgeOpts(f, WithStorage(storage.Memory()))...),
	)
	if err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	}
	defer h.Close()
	waitCert(t, h, 30*time.Second)
	addr := waitBrowserAddr(t, h, f.Domain, "/ip6/::1/")
	if want := "/tls/sni/0--1." + testforge.PeerLabel(h.ID()) + "." + f.Domain + "/ws"; !strings.HasSuffix(addr.String(), want) {
		t.Fatalf("announced %s, want suffix %s", addr, want)
	}
	dialAndPing(t, f, h.ID(), addr)
}

// TestRestartFromStorage: a host restarted with the same identity and
// storage serves and announces its stored certificate before libp2p.New
// returns, with no broker, CA or DNS request at all.
func TestRestartFromStorage(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	key := genKey(t, 1 /* Ed25519 */)
	store := storage.Memory()
	h1 := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, WithStorage(store))
	first := waitCert(t, h1, 30*time.Second)
	h1.Close()

	before := f.Stats()
	h2 := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, WithStorage(store))
	if len(browserAddrs(h2, f.Domain)) == 0 {
		t.Fatalf("no browser address right after libp2p.New: %v", h2.Addrs())
	}
	ev := waitCert(t, h2, time.Second)
	if ev.Source != FromStorage || !ev.NotAfter.Equal(first.NotAfter) {
		t.Fatalf("event %+v, want the stored certificate", ev)
	}
	dialAndPing(t, f, h2.ID(), waitBrowserAddr(t, h2, f.Domain, "/ip4/"))
	after := f.Stats()
	if after.Health != before.Health || after.Challenge != before.Challenge || after.CA != before.CA || after.DNSTXT != before.DNSTXT {
		t.Fatalf("restart made requests: before %+v, after %+v", before, after)
	}
}

// TestOtherTransportsSurviveBrokerOutage: with the broker down, a host with
// autotls still accepts TCP and QUIC connections, and announces no browser
// address.
func TestOtherTransportsSurviveBrokerOutage(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
		return true
	})
	fails := &failureLog{}
	h := newHost(t, f, []libp2p.Option{fails.option(t)}, WithStorage(storage.Memory()))
	var be *BrokerError
	if ev := fails.last(t); !errors.As(ev.Err, &be) || be.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("failure event %+v, want a 503 BrokerError", ev)
	}
	if got := browserAddrs(h, f.Domain); len(got) != 0 {
		t.Fatalf("browser addresses announced without a certificate: %v", got)
	}
	for _, proto := range []int{ma.P_TCP, ma.P_QUIC_V1} {
		var addr ma.Multiaddr
		for _, a := range h.Addrs() {
			if _, err := a.ValueForProtocol(proto); err == nil && !strings.Contains(a.String(), "/ws") && !strings.Contains(a.String(), "webtransport") {
				addr = a
				break
			}
		}
		if addr == nil {
			t.Fatalf("no address for protocol %d in %v", proto, h.Addrs())
		}
		d, err := libp2p.New(f.DialerOptions()...)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := d.Connect(ctx, peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{addr}}); err != nil {
			t.Fatalf("dial %s during broker outage: %v", addr, err)
		}
		if res := <-ping.Ping(ctx, d, h.ID()); res.Error != nil {
			t.Fatalf("ping over %s: %v", addr, res.Error)
		}
		cancel()
		d.Close()
	}
}

// TestNoGoroutineOutlivesHost: after host.Close, every goroutine autotls,
// certmagic and the host started is gone, whether the certificate was
// issued or the manager was still waiting on the broker.
func TestNoGoroutineOutlivesHost(t *testing.T) {
	f := startForge(t, testforge.Config{})
	// Goroutines of the forge and the test runner are not the host's.
	ignore := goleak.IgnoreCurrent()
	run := func(t *testing.T, fault bool) {
		if fault {
			f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
				http.Error(w, "unavailable", http.StatusServiceUnavailable)
				return true
			})
			defer f.SetBrokerFault(nil)
		}
		fails := &failureLog{}
		h, err := libp2p.New(append(f.HostOptions(), fails.option(t), Option(forgeOpts(f, WithStorage(storage.Memory()))...))...)
		if err != nil {
			t.Fatal(err)
		}
		if fault {
			fails.last(t) // it failed, and backs off
		} else {
			waitCert(t, h, 30*time.Second)
		}
		if err := h.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
		fails.stop()
	}
	t.Run("issued", func(t *testing.T) {
		run(t, false)
		goleak.VerifyNone(t, append(goleakIgnores(), ignore)...)
	})
	t.Run("broker down", func(t *testing.T) {
		run(t, true)
		goleak.VerifyNone(t, append(goleakIgnores(), ignore)...)
	})
	_ = runtime.NumGoroutine
}

// goleakIgnores lists long-lived goroutines that libraries start once per
// process (not per host).
func goleakIgnores() []goleak.Option {
	return []goleak.Option{
		goleak.IgnoreAnyFunction("github.com/ipfs/go-log/v2/writer.(*MirrorWriter).logRoutine"),
		goleak.IgnoreAnyFunction("go.opencensus.io/stats/view.(*worker).start"),
		goleak.IgnoreAnyFunction("github.com/libp2p/go-libp2p/p2p/transport/quicreuse.(*reuse).gc"),
	}
}
