package autotls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// startForge starts an in-process forge (Pebble, broker, DNS) for one test.
func startForge(t testing.TB, cfg testforge.Config) *testforge.Forge {
	t.Helper()
	f, err := testforge.Start(cfg)
	if err != nil {
		t.Fatalf("starting the test forge: %v", err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f
}

// forgeOpts are the autotls options pointing at the test forge.
func forgeOpts(f *testforge.Forge, extra ...Opt) []Opt {
	return append([]Opt{
		WithForgeDomain(f.Domain),
		WithRegistrationEndpoint(f.BrokerURL),
		WithCA(f.CAURL, f.CARoots),
		WithAllowPrivateAddrs(),
		WithResolver(f.Resolver()),
	}, extra...)
}

// newHost builds a loopback-only host with autotls pointed at f.
func newHost(t testing.TB, f *testforge.Forge, libp2pOpts []libp2p.Option, opts ...Opt) host.Host {
	t.Helper()
	all := append(f.HostOptions(), libp2pOpts...)
	all = append(all, Option(forgeOpts(f, opts...)...))
	h, err := libp2p.New(all...)
	if err != nil {
		t.Fatalf("libp2p.New: %v", err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

// waitCert waits for the host's certificate event.
func waitCert(t testing.TB, h host.Host, timeout time.Duration) EvtCertificateLoaded {
	t.Helper()
	sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	select {
	case e := <-sub.Out():
		return e.(EvtCertificateLoaded)
	case <-time.After(timeout):
		t.Fatalf("no certificate within %v", timeout)
	}
	return EvtCertificateLoaded{}
}

// browserAddrs returns the host's announced forge addresses.
func browserAddrs(h host.Host, forge string) []ma.Multiaddr {
	var out []ma.Multiaddr
	for _, a := range h.Addrs() {
		if strings.Contains(a.String(), "."+forge) {
			out = append(out, a)
		}
	}
	return out
}

// waitBrowserAddr waits until the host announces a forge address matching
// the given prefix (e.g. "/ip4/", "/dns4/").
func waitBrowserAddr(t testing.TB, h host.Host, forge, prefix string) ma.Multiaddr {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, a := range browserAddrs(h, forge) {
			if strings.HasPrefix(a.String(), prefix) {
				return a
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no %s browser address announced; have %v", prefix, h.Addrs())
	return nil
}

// dialAndPing connects a fresh dialer host, trusting only the forge's CA,
// to addr, and pings across.
func dialAndPing(t testing.TB, f *testforge.Forge, id peer.ID, addr ma.Multiaddr) {
	t.Helper()
	d, err := libp2p.New(f.DialerOptions()...)
	if err != nil {
		t.Fatalf("dialer: %v", err)
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := d.Connect(ctx, peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{addr}}); err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	conns := d.Network().ConnsToPeer(id)
	if len(conns) == 0 || !strings.Contains(conns[0].RemoteMultiaddr().String(), "/ws") {
		t.Fatalf("connection not over websocket: %v", conns)
	}
	res := <-ping.Ping(ctx, d, id)
	if res.Error != nil {
		t.Fatalf("ping over %s: %v", addr, res.Error)
	}
}

// tlsHandshake performs a TLS handshake with the host's WSS listener.
func tlsHandshake(addr string, sni string, roots *x509.CertPool) (*tls.ConnectionState, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{
		ServerName: sni,
		RootCAs:    roots,
		MinVersion: tls.VersionTLS12,
	})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	st := conn.ConnectionState()
	return &st, nil
}

func tcpHostPort(t testing.TB, a ma.Multiaddr) string {
	t.Helper()
	ip, err := a.ValueForProtocol(ma.P_IP4)
	if err != nil {
		t.Fatalf("no ip4 in %s", a)
	}
	port, err := a.ValueForProtocol(ma.P_TCP)
	if err != nil {
		t.Fatalf("no tcp in %s", a)
	}
	return net.JoinHostPort(ip, port)
}

func genKey(t testing.TB, typ int) crypto.PrivKey {
	t.Helper()
	bits := -1
	if typ == crypto.RSA {
		bits = 2048
	}
	k, _, err := crypto.GenerateKeyPair(typ, bits)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestIssueAllKeyTypes is the core pipeline end to end: a fresh identity of
// each key type gets a certificate from Pebble through the broker, the
// leaf chains to Pebble's root and names exactly *.<b36>.<forge>, the WSS
// listener completes a real TLS handshake for an IP name under it and
// refuses a foreign one, and a libp2p dial over the announced address
// carries a ping.
func TestIssueAllKeyTypes(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name string
		typ  int
	}{
		{"ed25519", crypto.Ed25519},
		{"rsa", crypto.RSA},
		{"secp256k1", crypto.Secp256k1},
		{"ecdsa", crypto.ECDSA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.Stats()
			h := newHost(t, f, []libp2p.Option{libp2p.Identity(genKey(t, tc.typ))}, WithStorage(storage.Memory()))
			ev := waitCert(t, h, 30*time.Second)

			want := "*." + testforge.PeerLabel(h.ID()) + "." + f.Domain
			if len(ev.Names) != 1 || ev.Names[0] != want || ev.Source != Obtained {
				t.Fatalf("event = %+v, want names [%s] from %s", ev, want, Obtained)
			}
			addr := waitBrowserAddr(t, h, f.Domain, "/ip4/127.0.0.1/")
			wantAddr := fmt.Sprintf("/tls/sni/127-0-0-1.%s.%s/ws", testforge.PeerLabel(h.ID()), f.Domain)
			if !strings.HasSuffix(addr.String(), wantAddr) {
				t.Fatalf("announced %s, want suffix %s", addr, wantAddr)
			}

			sni := "127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + f.Domain
			st, err := tlsHandshake(tcpHostPort(t, addr), sni, f.IssuerRoots)
			if err != nil {
				t.Fatalf("TLS handshake with SNI %s: %v", sni, err)
			}
			leaf := st.PeerCertificates[0]
			if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != want {
				t.Fatalf("leaf names %v, want [%s]", leaf.DNSNames, want)
			}
			if len(st.VerifiedChains) == 0 {
				t.Fatal("leaf does not chain to Pebble's root")
			}
			if _, err := tlsHandshake(tcpHostPort(t, addr), "127-0-0-1.k51qzi5uqu5dforeign."+f.Domain, f.IssuerRoots); err == nil {
				t.Fatal("handshake with a foreign SNI succeeded")
			}

			dialAndPing(t, f, h.ID(), addr)

			got := f.Stats()
			if d := got.Health - before.Health; d != 1 {
				t.Errorf("health checks = %d, want 1", d)
			}
			if d := got.Challenge - before.Challenge; d != 2 {
				t.Errorf("challenge requests = %d, want 2 (the two-leg PeerID-auth handshake)", d)
			}
		})
	}
}

func withManager(f func(*manager)) Opt {
	return func(c *config) error { c.onManager = f; return nil }
}

// TestRenewalHotSwap renews the certificate while the host runs: the
// second registration reuses the PeerID-auth bearer token (one request,
// after one health check: a renewal is gated like the first issuance), new handshakes see the new certificate, the event says
// Renewed, and a libp2p connection made before the renewal stays up.
func TestRenewalHotSwap(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	var m *manager
	h := newHost(t, f, nil, WithStorage(storage.Memory()), withManager(func(x *manager) { m = x }))
	sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	next := func() EvtCertificateLoaded {
		select {
		case e := <-sub.Out():
			return e.(EvtCertificateLoaded)
		case <-time.After(30 * time.Second):
			t.Fatal("no certificate event")
		}
		return EvtCertificateLoaded{}
	}
	first := next()
	afterFirst := f.Stats()
	addr := waitBrowserAddr(t, h, f.Domain, "/ip4/127.0.0.1/")

	d, err := libp2p.New(f.DialerOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := d.Connect(ctx, peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{addr}}); err != nil {
		t.Fatal(err)
	}
	conn := d.Network().ConnsToPeer(h.ID())[0]
	sni := "127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + f.Domain
	old, err := tlsHandshake(tcpHostPort(t, addr), sni, f.IssuerRoots)
	if err != nil {
		t.Fatal(err)
	}

	m.kick <- struct{}{}
	second := next()
	if first.Source != Obtained || second.Source != Renewed {
		t.Fatalf("sources = %s, %s; want obtained, renewed", first.Source, second.Source)
	}
	end := f.Stats()
	if n := end.Challenge - afterFirst.Challenge; n != 1 {
		t.Errorf("renewal cost %d broker requests, want 1 (bearer token reused)", n)
	}
	if n := end.Health - afterFirst.Health; n != 1 {
		t.Errorf("renewal made %d health checks, want 1", n)
	}
	st, err := tlsHandshake(tcpHostPort(t, addr), sni, f.IssuerRoots)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.PeerCertificates[0]; got.Equal(old.PeerCertificates[0]) || !got.NotAfter.Equal(second.NotAfter) {
		t.Fatalf("after renewal the handshake served serial %v, the same as before or not the renewed one", got.SerialNumber)
	}
	if conn.IsClosed() {
		t.Fatal("the connection made before the renewal was closed")
	}
	if res := <-ping.Ping(ctx, d, h.ID()); res.Error != nil {
		t.Fatalf("ping over the pre-renewal connection: %v", res.Error)
	}
}

// TestRenewalOnSchedule: with a short-lived certificate from the forge, the
// manager's own schedule (half the lifetime, for certificates under ten
// days) renews it before it expires, with no restart and no kick.
func TestRenewalOnSchedule(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{CertValidity: 4 * time.Second})
	h := newHost(t, f, nil, WithStorage(storage.Memory()))
	sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	var evs []EvtCertificateLoaded
	deadline := time.After(30 * time.Second)
	for len(evs) < 2 {
		select {
		case e := <-sub.Out():
			evs = append(evs, e.(EvtCertificateLoaded))
		case <-deadline:
			t.Fatalf("got %d certificate events, want an obtained and a renewed one", len(evs))
		}
	}
	if evs[1].Source != Renewed || !evs[1].NotAfter.After(evs[0].NotAfter) {
		t.Fatalf("second event %+v, want a renewal extending %v", evs[1], evs[0].NotAfter)
	}
	if !time.Now().Before(evs[0].NotAfter) {
		t.Fatalf("renewed only after the first certificate expired at %v", evs[0].NotAfter)
	}
	if len(browserAddrs(h, f.Domain)) == 0 {
		t.Fatal("browser address withdrawn across the renewal")
	}
}
