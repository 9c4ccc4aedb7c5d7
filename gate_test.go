package autotls

// Tests of the reachability gate on loopback, without
// WithAllowPrivateAddrs. On loopback AutoNAT cannot confirm anything (its
// servers must be public peers, and it only probes public addresses), so
// these tests emit go-libp2p's own AutoNAT events on the host's bus, as
// AutoNAT would, and treat loopback addresses as public (withLoopbackPublic).
// The real AutoNAT v1 and v2, with real servers, a NAT and a firewall, run
// in the network-namespace tests of the simulated internet.

import (
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	"github.com/libp2p/go-libp2p/p2p/protocol/autonatv2"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// withLoopbackPublic makes the gate, the broker's addresses and the address
// factory take loopback addresses for public ones.
func withLoopbackPublic() Opt {
	return func(c *config) error {
		c.isPublic = func(a ma.Multiaddr) bool { return manet.IsIPLoopback(a) || manet.IsPublicAddr(a) }
		return nil
	}
}

// gateRig is a loopback host in production configuration (no
// WithAllowPrivateAddrs) on the fake clock, with what the gate tests look
// at.
type gateRig struct {
	*faultRig
	reach *eventLog[EvtReachabilityChanged]
	certs *eventLog[EvtCertificateLoaded]
}

// startGateRig starts a host against f, confined to loopback by
// host (nil: f.HostOptions(): TCP and QUIC), with libp2pOpts and opts
// added.
func startGateRig(t *testing.T, f *testforge.Forge, clk *fakeClock, host []libp2p.Option, libp2pOpts []libp2p.Option, opts ...Opt) *gateRig {
	t.Helper()
	r := &gateRig{
		faultRig: &faultRig{f: f, clk: clk, logs: &logCapture{}, fails: &failureLog{}},
		reach:    &eventLog[EvtReachabilityChanged]{},
		certs:    &eventLog[EvtCertificateLoaded]{},
	}
	if host == nil {
		host = f.HostOptions()
	}
	all := append(slices.Clone(host), libp2pOpts...)
	all = append(all, r.fails.option(t), r.reach.option(t), r.certs.option(t), Option(append([]Opt{
		WithForgeDomain(f.Domain),
		WithRegistrationEndpoint(f.BrokerURL),
		WithCA(f.CAURL, f.CARoots),
		WithResolver(f.Resolver()),
		WithStorage(storage.Memory()),
		WithLogger(r.logs.logger()),
		withClock(clk),
		withLoopbackPublic(),
		withManager(func(m *manager) { r.m = m }),
	}, opts...)...))
	h, err := libp2p.New(all...)
	if err != nil {
		t.Fatalf("libp2p.New: %v", err)
	}
	r.h = h
	r.closers = append(r.closers, r.fails.stop, r.reach.stop, r.certs.stop)
	t.Cleanup(func() { _ = h.Close() })
	return r
}

// tcpOnly are f.HostOptions() with a loopback TCP listener only, no QUIC.
func tcpOnly(f *testforge.Forge) []libp2p.Option {
	opts := f.HostOptions()
	// The first of them is the listen addresses; the gater and the
	// forge's DNS stay.
	return append([]libp2p.Option{libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0")}, opts[1:]...)
}

// waitReach waits for an EvtReachabilityChanged with state st.
func (r *gateRig) waitReach(t testing.TB, st Reachability) EvtReachabilityChanged {
	t.Helper()
	_, e := r.reach.waitFor(t, 0, "reachability "+string(st), func(e EvtReachabilityChanged) bool { return e.Reachability == st })
	return e
}

// waitLog waits until a line containing s has been logged, and returns it.
func (r *gateRig) waitLog(t testing.TB, s string) logLine {
	t.Helper()
	return r.waitLogs(t, s, 1)
}

// waitLogs waits until n lines containing s have been logged, and returns
// the n-th.
func (r *gateRig) waitLogs(t testing.TB, s string, n int) logLine {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if ls := r.linesWith(s); len(ls) >= n {
			return ls[n-1]
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing logged containing %q; log:\n%s", s, r.logs)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// linesWith returns the lines whose message contains s.
func (r *gateRig) linesWith(s string) []logLine {
	var out []logLine
	for _, l := range r.logs.all() {
		if strings.Contains(l.msg, s) {
			out = append(out, l)
		}
	}
	return out
}

// listenAddr returns the host's listen address whose string contains proto
// and no /ws.
func listenAddr(t testing.TB, h host.Host, proto string) ma.Multiaddr {
	t.Helper()
	for _, a := range h.Network().ListenAddresses() {
		s := a.String()
		if strings.Contains(s, proto) && !strings.Contains(s, "/ws") {
			return a
		}
	}
	t.Fatalf("no %s listen address in %v", proto, h.Network().ListenAddresses())
	return nil
}

// autoNAT emits AutoNAT's events on a host's bus, as go-libp2p's AutoNAT
// v1 (EvtLocalReachabilityChanged) and v2 (through the host's address
// manager, EvtHostReachableAddrsChanged) do.
type autoNAT struct {
	v1, v2 event.Emitter
}

func newAutoNAT(t testing.TB, h host.Host) *autoNAT {
	t.Helper()
	v1, err := h.EventBus().Emitter(new(event.EvtLocalReachabilityChanged), eventbus.Stateful)
	if err != nil {
		t.Fatal(err)
	}
	v2, err := h.EventBus().Emitter(new(event.EvtHostReachableAddrsChanged), eventbus.Stateful)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = v1.Close(); _ = v2.Close() })
	return &autoNAT{v1, v2}
}

func (a *autoNAT) v1Public(t testing.TB) {
	t.Helper()
	if err := a.v1.Emit(event.EvtLocalReachabilityChanged{Reachability: network.ReachabilityPublic}); err != nil {
		t.Fatal(err)
	}
}

func (a *autoNAT) v2Says(t testing.TB, reachable, unreachable []ma.Multiaddr) {
	t.Helper()
	if err := a.v2.Emit(event.EvtHostReachableAddrsChanged{Reachable: reachable, Unreachable: unreachable}); err != nil {
		t.Fatal(err)
	}
}

// connectPeer connects a fresh loopback host to h, and returns the
// function that closes it.
func connectPeer(t *testing.T, f *testforge.Forge, h host.Host) func() {
	t.Helper()
	d, err := libp2p.New(f.DialerOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	closeIt := func() { _ = d.Close() }
	t.Cleanup(closeIt)
	if err := d.Connect(t.Context(), peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}); err != nil {
		t.Fatalf("connecting a peer: %v", err)
	}
	return closeIt
}

// brokerWatch records, per peer, the addresses the forge's broker was asked
// to dial back, and counts the broker requests made before the test opened
// the gate.
type brokerWatch struct {
	open  atomic.Bool
	early atomic.Int64
	mu    sync.Mutex
	dials map[peer.ID][][]string
}

func watchBroker(t *testing.T, f *testforge.Forge) *brokerWatch {
	w := &brokerWatch{dials: map[peer.ID][][]string{}}
	f.SetBrokerFault(func(http.ResponseWriter, *http.Request) bool {
		if !w.open.Load() {
			w.early.Add(1)
		}
		return false
	})
	f.SetDialBackFault(func(id peer.ID, addrs []string) error {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.dials[id] = append(w.dials[id], slices.Clone(addrs))
		return nil
	})
	t.Cleanup(func() { f.SetBrokerFault(nil); f.SetDialBackFault(nil) })
	return w
}

func (w *brokerWatch) dialsOf(id peer.ID) [][]string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.dials[id])
}

// TestGateWaitsForTCP: without WithAllowPrivateAddrs, nothing goes to the
// broker or the CA until a TCP address is confirmed: not while AutoNAT is
// silent, not on AutoNAT v1's Public when the host also has a QUIC
// address (v1 may have dialled that) and v2 confirmed only QUIC, not when
// v2 found the TCP address unreachable. Once v2 confirms the TCP address
// the certificate is obtained, the broker is given that one address to
// dial back, and a browser-style dial over the announced address works.
// A TCP-only host whose AutoNAT v1 says Public (v1 can only have dialled
// TCP) passes on v1 alone.
func TestGateWaitsForTCP(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name    string
		tcpOnly bool
		// before emits AutoNAT's verdicts while the host waits.
		before func(t *testing.T, a *autoNAT, tcp, quic ma.Multiaddr)
		state  Reachability // the gate's state after them
		// v1Opens: v1 alone opens the gate (no v2 confirmation needed).
		v1Opens bool
	}{
		{name: "AutoNAT silent", state: ReachabilityUnknown},
		{name: "v1 public, v2 confirmed only QUIC", state: ReachabilityUnknown,
			before: func(t *testing.T, a *autoNAT, _, quic ma.Multiaddr) {
				a.v1Public(t)
				a.v2Says(t, []ma.Multiaddr{quic}, nil)
			}},
		{name: "v2 found TCP unreachable, QUIC reachable, v1 public", state: ReachabilityUnreachable,
			before: func(t *testing.T, a *autoNAT, tcp, quic ma.Multiaddr) {
				a.v2Says(t, []ma.Multiaddr{quic}, []ma.Multiaddr{tcp})
				a.v1Public(t)
			}},
		{name: "TCP-only host, v1 public, v2 found TCP unreachable", tcpOnly: true, state: ReachabilityUnreachable,
			before: func(t *testing.T, a *autoNAT, tcp, _ ma.Multiaddr) {
				a.v2Says(t, nil, []ma.Multiaddr{tcp})
				a.v1Public(t)
			}},
		{name: "TCP-only host, v1 public", tcpOnly: true, v1Opens: true,
			before: func(t *testing.T, a *autoNAT, _, _ ma.Multiaddr) { a.v1Public(t) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			w := watchBroker(t, f)
			clk := newClockAtNow()
			// After the no-peers warning is due, before the first ARI
			// poll: the waits of an issuance fit.
			clk.SetHorizon(clk.Now().Add(10 * time.Minute))
			var listen []libp2p.Option
			if tc.tcpOnly {
				listen = tcpOnly(f)
			}
			before := f.Stats()
			r := startGateRig(t, f, clk, listen, nil)
			tcp := listenAddr(t, r.h, "/tcp/")
			var quic ma.Multiaddr
			if !tc.tcpOnly {
				quic = listenAddr(t, r.h, "/quic-v1")
			}
			an := newAutoNAT(t, r.h)
			r.waitLog(t, "waiting for AutoNAT to confirm a public TCP address")
			// A minute without peers passes on the fake clock: the host
			// says that AutoNAT has no one to ask.
			noPeers, _ := r.reach.waitFor(t, 0, "no-peers reachability", func(e EvtReachabilityChanged) bool { return e.Reachability == ReachabilityNoPeers })
			if tc.before != nil {
				tc.before(t, an, tcp, quic)
			}

			if tc.v1Opens {
				w.open.Store(true) // the broker may be asked from here on
			} else {
				// The event the last verdict leads to: AutoNAT's
				// events are handled in order, so the earlier ones have
				// been by then. With no verdict of its own, a peer
				// connecting ends the no-peers state.
				if tc.state == ReachabilityUnknown {
					r.closers = append(r.closers, connectPeer(t, f, r.h))
				}
				_, e := r.reach.waitFor(t, noPeers+1, "reachability "+string(tc.state), func(e EvtReachabilityChanged) bool { return e.Reachability == tc.state })
				if tc.state == ReachabilityUnreachable && !sameAddrs(e.Addrs, []string{tcp.String()}) {
					t.Errorf("unreachable addresses %v, want [%s]", e.Addrs, tcp)
				}
				if slices.ContainsFunc(r.reach.all(), func(e EvtReachabilityChanged) bool { return e.Reachability == ReachabilityPublic }) {
					t.Fatalf("reachability events %+v: public before a TCP address was confirmed", r.reach.all())
				}
				if s := f.Stats(); s.Health != before.Health || s.Challenge != before.Challenge || s.CA != before.CA {
					t.Fatalf("requests while unconfirmed: %+v, before %+v", s, before)
				}
				w.open.Store(true)
				an.v2Says(t, []ma.Multiaddr{tcp}, nil)
			}
			_, pub := r.reach.waitFor(t, 0, "public reachability", func(e EvtReachabilityChanged) bool { return e.Reachability == ReachabilityPublic })
			if !sameAddrs(pub.Addrs, []string{tcp.String()}) {
				t.Errorf("public event addresses %v, want [%s]", pub.Addrs, tcp)
			}
			if _, ok := r.certs.wait(30*time.Second, func(EvtCertificateLoaded) bool { return true }); !ok {
				t.Fatalf("no certificate within 30 s; log:\n%s", r.logs)
			}
			if n := w.early.Load(); n != 0 {
				t.Errorf("%d broker requests before the gate opened", n)
			}
			dials := w.dialsOf(r.h.ID())
			if len(dials) != 1 || !slices.Equal(dials[0], []string{tcp.String()}) {
				t.Errorf("the broker was asked to dial back %v, want [[%s]]", dials, tcp)
			}

			// What the operator read.
			by := "AutoNAT v2"
			if tc.v1Opens {
				by = "AutoNAT v1"
			}
			conf := r.linesWith("public TCP reachability confirmed")
			if len(conf) != 1 || !strings.Contains(conf[0].text, tcp.String()) || !strings.Contains(conf[0].text, by) {
				t.Errorf("confirmation lines %v, want one naming %s and %s", conf, tcp, by)
			}
			if asked := r.linesWith("asking the broker"); len(asked) != 1 || !strings.Contains(asked[0].text, tcp.String()) {
				t.Errorf("broker lines %v, want one naming %s", asked, tcp)
			}
			unreach := r.linesWith("AutoNAT cannot reach")
			if tc.state == ReachabilityUnreachable {
				if len(unreach) != 1 || unreach[0].level != slog.LevelWarn {
					t.Errorf("unreachable warnings %v, want one", unreach)
				} else {
					for _, s := range []string{tcp.String(), "port forward", "firewall"} {
						if !strings.Contains(unreach[0].text, s) {
							t.Errorf("the unreachable warning does not say %q: %s", s, unreach[0].text)
						}
					}
				}
			} else if len(unreach) != 0 {
				t.Errorf("unreachable warnings %v, want none", unreach)
			}
			lonely := r.linesWith("no peer connected")
			if len(lonely) != 1 || lonely[0].level != slog.LevelWarn {
				t.Errorf("no-peers warnings %v, want one", lonely)
			} else {
				for _, s := range []string{"AutoNAT needs peers", "bootstrap peers", "libp2p.ForceReachabilityPublic"} {
					if !strings.Contains(lonely[0].text, s) {
						t.Errorf("the no-peers warning does not say %q: %s", s, lonely[0].text)
					}
				}
			}

			addr := waitBrowserAddr(t, r.h, f.Domain, "/ip4/127.0.0.1/")
			dialAndPing(t, f, r.h.ID(), addr)
			r.closeAndCheck(t, leaks)
		})
	}
}

// TestAssess covers the gate's rule, address by address.
func TestAssess(t *testing.T) {
	t.Parallel()
	m := ma.StringCast
	tcp4, tcp6 := m("/ip4/1.2.3.4/tcp/4001"), m("/ip6/2606:4700::1/tcp/4001")
	quic := m("/ip4/1.2.3.4/udp/4001/quic-v1")
	wss := m("/ip4/1.2.3.4/tcp/4001/tls/sni/*.libp2p.direct/ws")
	privTCP, privQUIC := m("/ip4/192.168.1.2/tcp/4001"), m("/ip4/192.168.1.2/udp/4001/quic-v1")
	nat64 := m("/ip6/64:ff9b::102:304/tcp/4001")
	relay := m("/ip4/198.51.100.1/udp/4001/quic-v1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq/p2p-circuit")
	ms := func(as ...ma.Multiaddr) []ma.Multiaddr { return as }
	for _, tc := range []struct {
		name  string
		in    gateInput
		state Reachability
		addrs []ma.Multiaddr
		by    string
	}{
		{name: "nothing known", in: gateInput{hostAddrs: ms(tcp4, quic)}, state: ReachabilityUnknown},
		{name: "v2 confirmed TCP", in: gateInput{reachable: ms(quic, tcp4, wss), hostAddrs: ms(tcp4, quic)}, state: ReachabilityPublic, addrs: ms(tcp4), by: "AutoNAT v2"},
		{name: "v2 confirmed TCP, v1 not public", in: gateInput{reachable: ms(tcp6)}, state: ReachabilityPublic, addrs: ms(tcp6), by: "AutoNAT v2"},
		{name: "v2 confirmed only QUIC and WSS", in: gateInput{reachable: ms(quic, wss), v1Public: true, hostAddrs: ms(tcp4, quic)}, state: ReachabilityUnknown},
		{name: "v2 confirmed private TCP", in: gateInput{reachable: ms(privTCP)}, state: ReachabilityUnknown},
		{name: "v2 confirmed NAT64", in: gateInput{reachable: ms(nat64)}, state: ReachabilityUnknown},
		{name: "v1 public, TCP only", in: gateInput{v1Public: true, hostAddrs: ms(tcp4, wss, privQUIC, relay)}, state: ReachabilityPublic, addrs: ms(tcp4), by: "AutoNAT v1"},
		{name: "v1 public, QUIC too", in: gateInput{v1Public: true, hostAddrs: ms(tcp4, quic)}, state: ReachabilityUnknown},
		{name: "v1 public, no public TCP", in: gateInput{v1Public: true, hostAddrs: ms(privTCP, nat64)}, state: ReachabilityUnknown},
		{name: "forced public, QUIC too", in: gateInput{v1Public: true, forced: true, hostAddrs: ms(tcp4, quic, tcp6)}, state: ReachabilityPublic, addrs: ms(tcp4, tcp6), by: "libp2p.ForceReachabilityPublic"},
		{name: "forced public, v2 found one TCP unreachable", in: gateInput{v1Public: true, forced: true, unreachable: ms(tcp4), hostAddrs: ms(tcp4, tcp6)}, state: ReachabilityPublic, addrs: ms(tcp6), by: "libp2p.ForceReachabilityPublic"},
		{name: "forced public, v2 found TCP unreachable", in: gateInput{v1Public: true, forced: true, unreachable: ms(tcp4), hostAddrs: ms(tcp4, quic)}, state: ReachabilityUnreachable, addrs: ms(tcp4)},
		{name: "v2 found TCP unreachable", in: gateInput{unreachable: ms(tcp4, quic), hostAddrs: ms(tcp4, quic)}, state: ReachabilityUnreachable, addrs: ms(tcp4)},
		{name: "v2 found only QUIC unreachable", in: gateInput{unreachable: ms(quic), hostAddrs: ms(tcp4, quic)}, state: ReachabilityUnknown},
		{name: "no peers", in: gateInput{noPeers: true, hostAddrs: ms(tcp4)}, state: ReachabilityNoPeers},
		{name: "no peers, unreachable known", in: gateInput{noPeers: true, unreachable: ms(tcp4)}, state: ReachabilityUnreachable, addrs: ms(tcp4)},
		{name: "no peers, confirmed known", in: gateInput{noPeers: true, reachable: ms(tcp4)}, state: ReachabilityPublic, addrs: ms(tcp4), by: "AutoNAT v2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.in.public = manet.IsPublicAddr
			st, addrs, by := assess(tc.in)
			if st != tc.state || !slices.EqualFunc(addrs, tc.addrs, ma.Multiaddr.Equal) || by != tc.by {
				t.Fatalf("assess = %s %v %q, want %s %v %q", st, addrs, by, tc.state, tc.addrs, tc.by)
			}
		})
	}
}

// TestGateForcedPublic: with libp2p.ForceReachabilityPublic, go-libp2p's
// own AutoNAT v1 says Public at once, and the gate opens on the host's TCP
// address with no AutoNAT v2 verdict, QUIC listener or not (the operator
// vouched for the host). The broker is given the TCP address only.
func TestGateForcedPublic(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	w := watchBroker(t, f)
	w.open.Store(true)
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(10 * time.Minute))
	r := startGateRig(t, f, clk, nil, []libp2p.Option{libp2p.ForceReachabilityPublic()})
	tcp := listenAddr(t, r.h, "/tcp/")
	if _, ok := r.certs.wait(30*time.Second, func(EvtCertificateLoaded) bool { return true }); !ok {
		t.Fatalf("no certificate within 30 s; log:\n%s", r.logs)
	}
	if e := r.waitReach(t, ReachabilityPublic); !sameAddrs(e.Addrs, []string{tcp.String()}) {
		t.Errorf("public event addresses %v, want [%s]", e.Addrs, tcp)
	}
	if dials := w.dialsOf(r.h.ID()); len(dials) != 1 || !slices.Equal(dials[0], []string{tcp.String()}) {
		t.Errorf("the broker was asked to dial back %v, want [[%s]]", dials, tcp)
	}
	if conf := r.linesWith("public TCP reachability confirmed"); len(conf) != 1 || !strings.Contains(conf[0].text, "libp2p.ForceReachabilityPublic") {
		t.Errorf("confirmation lines %v, want one naming libp2p.ForceReachabilityPublic", conf)
	}
}

// TestGateRenewal: a renewal is gated like the first issuance. While
// AutoNAT v2 finds the TCP address unreachable, a renewal that is due
// waits, says so once, and sends nothing to the broker or the CA; the
// certificate in use is still served. Once the address is confirmed again
// the renewal goes through at once (after a broker health check). When
// reachability does not come back, the certificate is served until it
// lapses, and then withdrawn.
func TestGateRenewal(t *testing.T) {
	// Not parallel: the leak check sees every goroutine.
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	clk := newClockAtNow()
	// Before the first ARI poll (15 to 30 minutes after each issuance),
	// so the run loop parks after each certificate.
	clk.SetHorizon(clk.Now().Add(10 * time.Minute))
	r := startGateRig(t, f, clk, nil, nil)
	tcp, quic := listenAddr(t, r.h, "/tcp/"), listenAddr(t, r.h, "/quic-v1")
	an := newAutoNAT(t, r.h)
	an.v2Says(t, []ma.Multiaddr{tcp}, nil)
	if _, ok := r.certs.wait(30*time.Second, func(EvtCertificateLoaded) bool { return true }); !ok {
		t.Fatalf("no certificate within 30 s; log:\n%s", r.logs)
	}
	served := r.m.cert.Load()
	serial := served.leaf.SerialNumber.String()

	// Reachability lost, then the renewal comes due.
	lost := func() {
		t.Helper()
		n := len(r.reach.all())
		an.v2Says(t, []ma.Multiaddr{quic}, []ma.Multiaddr{tcp})
		r.reach.waitFor(t, n, "unreachable", func(e EvtReachabilityChanged) bool { return e.Reachability == ReachabilityUnreachable })
	}
	lost()
	before := f.Stats()
	r.kick(t)
	l := r.waitLog(t, "certificate renewal waits")
	if l.level != slog.LevelWarn || !strings.Contains(l.text, "not_after="+served.leaf.NotAfter.Format(time.RFC3339)) {
		t.Errorf("the waiting renewal says %q, want a warning naming the expiry", l.text)
	}
	if v := r.m.reachStatus(); !v.Waiting || v.State != ReachabilityUnreachable || !v.Checked {
		t.Errorf("reachability view %+v, want waiting, unreachable", v)
	}
	if got := servedSerial(t, r.faultRig); got != serial {
		t.Errorf("while the renewal waits, a handshake gets serial %q, want the certificate in use, %s", got, serial)
	}
	if s := f.Stats(); s != before {
		t.Fatalf("requests while the renewal waits: %+v, before %+v", s, before)
	}

	// Back: the renewal goes through.
	n := len(r.certs.all())
	an.v2Says(t, []ma.Multiaddr{tcp}, nil)
	_, renewed := r.certs.waitFor(t, n, "renewed certificate", func(e EvtCertificateLoaded) bool { return true })
	if renewed.Source != Renewed {
		t.Errorf("after reachability returned: %+v, want a renewal", renewed)
	}
	if s := f.Stats(); s.Health != before.Health+1 {
		t.Errorf("the renewal made %d health checks, want 1", s.Health-before.Health)
	}
	if n := len(r.linesWith("certificate renewal waits")); n != 1 {
		t.Errorf("the waiting renewal was logged %d times, want once", n)
	}

	// Lost again, for good: the certificate is served until it lapses.
	lost()
	cur := r.m.cert.Load()
	r.kick(t)
	r.waitLogs(t, "certificate renewal waits", 2)
	before = f.Stats()
	sub, err := r.h.EventBus().Subscribe(new(EvtCertificateExpired))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	clk.SetHorizon(cur.leaf.NotAfter.Add(time.Second))
	select {
	case <-sub.Out():
	case <-time.After(30 * time.Second):
		t.Fatalf("the certificate was not withdrawn when it lapsed; log:\n%s", r.logs)
	}
	if a := browserAddrs(r.h, f.Domain); len(a) != 0 {
		t.Errorf("browser addresses %v still announced after the certificate lapsed", a)
	}
	if s := f.Stats(); s != before {
		t.Errorf("requests while waiting for reachability: %+v, before %+v", s, before)
	}
	r.closeAndCheck(t, leaks)
}

// TestGateNoPeers: a host with no peer for a minute says, once, that
// AutoNAT has no one to ask and what to do about it, and emits the state;
// a peer connecting ends the state, and losing it again brings the state
// back without a second warning.
func TestGateNoPeers(t *testing.T) {
	// Not parallel: the leak check sees every goroutine.
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	clk := newClockAtNow() // no horizon: the host's minute alone passes at once
	start := clk.Now()
	r := startGateRig(t, f, clk, nil, nil)
	i, _ := r.reach.waitFor(t, 0, "no-peers", func(e EvtReachabilityChanged) bool { return e.Reachability == ReachabilityNoPeers })
	if waited := clk.Now().Sub(start); waited < noPeersAfter {
		t.Errorf("no-peers after %v, want %v", waited, noPeersAfter)
	}
	closePeer := connectPeer(t, f, r.h)
	i, _ = r.reach.waitFor(t, i+1, "unknown", func(e EvtReachabilityChanged) bool { return e.Reachability == ReachabilityUnknown })
	closePeer()
	r.reach.waitFor(t, i+1, "no-peers again", func(e EvtReachabilityChanged) bool { return e.Reachability == ReachabilityNoPeers })
	lines := r.linesWith("no peer connected")
	if len(lines) != 2 || lines[0].level != slog.LevelWarn || lines[1].level != slog.LevelDebug {
		t.Errorf("no-peers lines %+v, want a warning, then a debug line", lines)
	}
	for _, l := range r.logs.atLeast(slog.LevelInfo) {
		if strings.Contains(l.msg, "reachability confirmed") || strings.Contains(l.msg, "cannot reach") {
			t.Errorf("logged %q with no AutoNAT verdict", l.msg)
		}
	}
	r.closeAndCheck(t, leaks)
}

// BenchmarkNewHostGate is the cost of what the gate adds to a host: AutoNAT
// v2 (a second, dial-only swarm) and the watcher. It builds and closes a
// host with a stored certificate (served before libp2p.New returns), with
// the gate (production) and without (WithAllowPrivateAddrs).
func BenchmarkNewHostGate(b *testing.B) {
	quietLibp2p()
	f := startForge(b, testforge.Config{})
	key, store := storedCert(b, f)
	for _, gate := range []bool{false, true} {
		name := "no gate"
		if gate {
			name = "gate"
		}
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			var m *manager
			for range b.N {
				opts := []Opt{WithForgeDomain(f.Domain), WithRegistrationEndpoint(f.BrokerURL), WithCA(f.CAURL, f.CARoots),
					WithResolver(f.Resolver()), WithLogger(benchLogger), WithStorage(store), withManager(func(x *manager) { m = x })}
				if !gate {
					opts = append(opts, WithAllowPrivateAddrs())
				}
				h, err := libp2p.New(append(f.HostOptions(), libp2p.Identity(key), Option(opts...))...)
				if err != nil {
					b.Fatal(err)
				}
				if m.cert.Load() == nil {
					b.Fatal("the stored certificate is not served")
				}
				b.StopTimer()
				_ = h.Close()
				b.StartTimer()
			}
		})
	}
}

// TestOptionAutoNATv2: Option turns on AutoNAT v2 (seen from outside: the
// host answers its dial requests) unless private addresses are allowed,
// which skips the gate that needs it.
func TestOptionAutoNATv2(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	for _, allowPrivate := range []bool{false, true} {
		opts := []Opt{WithForgeDomain(f.Domain), WithRegistrationEndpoint(f.BrokerURL), WithCA(f.CAURL, f.CARoots),
			WithResolver(f.Resolver()), WithStorage(storage.Memory()), WithLogger(slog.New(slog.DiscardHandler)),
			withClock(newClockAtNowParked())}
		if allowPrivate {
			opts = append(opts, WithAllowPrivateAddrs())
		}
		h, err := libp2p.New(append(f.HostOptions(), Option(opts...))...)
		if err != nil {
			t.Fatal(err)
		}
		got := slices.Contains(h.Mux().Protocols(), autonatv2.DialProtocol)
		_ = h.Close()
		if got == allowPrivate {
			t.Errorf("with allowPrivate=%v, AutoNAT v2 on = %v", allowPrivate, got)
		}
	}
}
