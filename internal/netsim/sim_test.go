package netsim_test

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/p2ptls/autotls/internal/netsim"
	"github.com/p2ptls/autotls/internal/testforge"
)

func TestMain(m *testing.M) {
	if role := os.Getenv(roleEnv); role != "" {
		os.Exit(runRole(role))
	}
	// The topologies spend their time waiting for processes of their own
	// (AutoNAT, certificate lapse): run them all at once unless told
	// otherwise, not GOMAXPROCS at a time.
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		_ = flag.Set("test.parallel", "16")
	}
	os.Exit(m.Run())
}

// firewallTCP drops new inbound TCP connections to the host's port in ns;
// QUIC (UDP) stays open, and so do the host's outbound connections.
func firewallTCP(n *netsim.Net, ns string) {
	n.Nft(ns, `table inet fw {
	chain in { type filter hook input priority filter; tcp dport 4001 ct state new drop; }
}
`)
}

// topology is one case of the simulated internet.
type topology struct {
	name        string
	v6          bool // the host under test has IPv6 only (else IPv4 only)
	nat         bool // the host is behind a NAT (IPv4)
	forward     bool // the NAT forwards the host's TCP port
	firewallTCP bool // inbound TCP to the host is dropped; QUIC is open
	autoNATv2   bool // the host keeps the AutoNAT v2 client autotls.Option turns on
	noPeers     bool // the host connects to nobody
	wantCert    bool
	externalIP  string // the address the certificate's WSS address must carry
}

const nServers = 5

// TestSimulatedInternet runs the host under test in production
// configuration (no WithAllowPrivateAddrs) in one topology per subtest:
//
//	client (5.200.0.2) ── c0 ┐
//	                         core: forge 5.0.0.1, AutoNAT servers 5.1-5.5.0.1 (and 2a0f:5::1, 2a0f:5:1-5::1)
//	host (5.100.0.2)   ── h0 ┘    or  nat (5.66.0.2, nft masquerade [+ DNAT tcp/4001]) ── host (10.0.0.2)
//
// Every process runs in its own namespace and checks it first; no namespace
// has a route out. Each subtest logs, per topology, when the gate found the
// host public and when the certificate was served, counted from the host
// process's start:
//
//	go test -race -count=1 -run TestSimulatedInternet -v ./internal/netsim/ | grep timing
func TestSimulatedInternet(t *testing.T) {
	cases := []topology{
		{name: "public-ipv4", autoNATv2: true, wantCert: true, externalIP: "5.100.0.2"},
		{name: "public-ipv6", v6: true, autoNATv2: true, wantCert: true, externalIP: "2a0f:5:100::2"},
		{name: "nat-no-forward", nat: true, autoNATv2: true},
		{name: "nat-tcp-forward", nat: true, forward: true, autoNATv2: true, wantCert: true, externalIP: "5.66.0.2"},
		{name: "tcp-firewalled-quic-open", firewallTCP: true, autoNATv2: true},
		{name: "tcp-firewalled-quic-open-v1-only", firewallTCP: true},
		{name: "no-peers", autoNATv2: true, noPeers: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			runTopology(t, tc)
		})
	}
	t.Run("reachability-lost-before-renewal", func(t *testing.T) {
		t.Parallel()
		runLostBeforeRenewal(t)
	})
	t.Run("reachability-returns-before-lapse", func(t *testing.T) {
		t.Parallel()
		runReturnsBeforeLapse(t)
	})
}

// sim is one running simulation: its namespaces and its core process.
type sim struct {
	n                  *netsim.Net
	core, host, client string
	coreProc           *proc
	forge              forgeInfo
	peers, listen      []string
	hostIfaces         []string
}

// buildSim creates the namespaces of tc and starts the core: the forge
// (issuing certificates valid for certValidity, 0 for Pebble's default)
// and the AutoNAT servers.
func buildSim(t *testing.T, tc topology, certValidity time.Duration) *sim {
	n := netsim.New(t)
	core := n.NS("core")
	host := n.NS("host")
	client := n.NS("client")
	n.Forwarding(core)

	// The core: the forge and the AutoNAT servers, each at an address of
	// its own (distinct IPv4 addresses and IPv6 /56s: distinct observers
	// for go-libp2p's observed-address manager).
	n.Addr(core, "lo", "5.0.0.1/32")
	n.Addr(core, "lo", "2a0f:5::1/128")
	var serverIPs [][]string
	for i := 1; i <= nServers; i++ {
		v4, v6 := fmt.Sprintf("5.%d.0.1", i), fmt.Sprintf("2a0f:5:%d::1", i)
		n.Addr(core, "lo", v4+"/32")
		n.Addr(core, "lo", v6+"/128")
		serverIPs = append(serverIPs, []string{v4, v6})
	}
	coreIfaces := []string{"c0"}

	// The host's side.
	var listen []string
	switch {
	case tc.nat:
		nat := n.NS("nat")
		n.Forwarding(nat)
		n.Link(core, "n0", []string{"5.66.0.1/24"}, nat, "out0", []string{"5.66.0.2/24"})
		n.Link(nat, "in0", []string{"10.0.0.1/24"}, host, "up0", []string{"10.0.0.2/24"})
		n.Route(nat, "5.0.0.0/8", "5.66.0.1")
		n.Route(host, "5.0.0.0/8", "10.0.0.1")
		rules := `table ip nat {
	chain post { type nat hook postrouting priority srcnat; oifname "out0" masquerade; }
	chain pre { type nat hook prerouting priority dstnat; `
		if tc.forward {
			rules += `iifname "out0" tcp dport 4001 dnat to 10.0.0.2:4001;`
		}
		rules += " }\n}\n"
		n.Nft(nat, rules)
		coreIfaces = append(coreIfaces, "n0")
		listen = []string{"/ip4/10.0.0.2/tcp/4001", "/ip4/10.0.0.2/udp/4001/quic-v1"}
	default:
		n.Link(core, "h0", []string{"5.100.0.1/24", "2a0f:5:100::1/64"}, host, "up0", []string{"5.100.0.2/24", "2a0f:5:100::2/64"})
		n.Route(host, "5.0.0.0/8", "5.100.0.1")
		n.Route(host, "2a0f:5::/32", "2a0f:5:100::1")
		coreIfaces = append(coreIfaces, "h0")
		if tc.v6 {
			listen = []string{"/ip6/2a0f:5:100::2/tcp/4001", "/ip6/2a0f:5:100::2/udp/4001/quic-v1"}
		} else {
			listen = []string{"/ip4/5.100.0.2/tcp/4001", "/ip4/5.100.0.2/udp/4001/quic-v1"}
		}
	}
	if tc.firewallTCP {
		firewallTCP(n, host)
	}

	// The browser's side.
	n.Link(core, "c0", []string{"5.200.0.1/24", "2a0f:5:200::1/64"}, client, "up0", []string{"5.200.0.2/24", "2a0f:5:200::2/64"})
	n.Route(client, "5.0.0.0/8", "5.200.0.1")
	n.Route(client, "2a0f:5::/32", "2a0f:5:200::1")

	forgeIP := "5.0.0.1"
	if tc.v6 {
		forgeIP = "2a0f:5::1"
	}
	coreProc := startRole(t, n, core, "core", coreParams{Ifaces: coreIfaces, ForgeIP: forgeIP, ServerIPs: serverIPs, CertValidity: certValidity})
	ready, _ := coreProc.await(0, 60*time.Second, "forge and AutoNAT servers", ev("ready"))
	fi := *ready.Forge

	// The host connects to the AutoNAT servers over TCP: go-libp2p would
	// pick QUIC for most of them, and behind a NAT the host learns its
	// external TCP address only from TCP connections (four observers at
	// least). Their QUIC addresses are still probed over these connections.
	var peers []string
	if !tc.noPeers {
		for _, s := range ready.Servers {
			if strings.HasPrefix(s, "/ip6/") == tc.v6 && strings.Contains(s, "/tcp/") {
				peers = append(peers, s)
			}
		}
	}
	return &sim{n: n, core: core, host: host, client: client, coreProc: coreProc, forge: fi, peers: peers, listen: listen, hostIfaces: []string{"up0"}}
}

// startHost starts the host under test; stateDir as in hostParams.
func (s *sim) startHost(t *testing.T, tc topology, stateDir string) (*proc, string) {
	t.Helper()
	p := startRole(t, s.n, s.host, "host", hostParams{
		Ifaces: s.hostIfaces, Listen: s.listen, Forge: s.forge, Peers: s.peers, NoAutoNATv2: !tc.autoNATv2, StateDir: stateDir,
	})
	started, _ := p.await(0, 30*time.Second, "host start", ev("started"))
	return p, started.ID
}

// stats returns the forge's counters.
func (s *sim) stats(t *testing.T) testforge.Stats {
	t.Helper()
	st, _ := s.forgeState(t)
	return st
}

// forgeState returns the forge's counters and the addresses of each
// dial-back its broker made.
func (s *sim) forgeState(t *testing.T) (testforge.Stats, [][]string) {
	t.Helper()
	i := len(s.coreProc.lines())
	s.coreProc.send("stats")
	st, _ := s.coreProc.await(i, 10*time.Second, "forge stats", ev("stats"))
	return *st.Stats, st.Dialed
}

// checkDialBacks checks that the host sent the broker only its external
// TCP address, in the thin-waist form /ipX/<externalIP>/tcp/<port>.
func checkDialBacks(t *testing.T, dialed [][]string, externalIP string) {
	t.Helper()
	if len(dialed) == 0 {
		t.Errorf("the broker dialled nobody back, yet a certificate was issued")
	}
	for _, addrs := range dialed {
		for _, a := range addrs {
			parts := strings.Split(a, "/")
			if len(parts) != 5 || (parts[1] != "ip4" && parts[1] != "ip6") || parts[2] != externalIP || parts[3] != "tcp" {
				t.Errorf("the host sent the broker %q (all: %v); want only /ipX/%s/tcp/<port>", a, addrs, externalIP)
			}
		}
	}
}

// dial has the browser's side dial the host's announced WSS address at
// externalIP and ping it.
func (s *sim) dial(t *testing.T, hostProc *proc, from int, id, externalIP string) msg {
	t.Helper()
	ann, _ := hostProc.await(from, 30*time.Second, "announced WSS address", func(m msg) bool {
		return m.Ev == "announced" && len(m.Addrs) > 0
	})
	var target string
	for _, a := range ann.Addrs {
		if strings.Contains(a, "/"+externalIP+"/") {
			target = a
		}
	}
	if target == "" {
		t.Fatalf("the host announces %v, none at the external address %s", ann.Addrs, externalIP)
	}
	target += "/p2p/" + id
	clientProc := startRole(t, s.n, s.client, "client", clientParams{Ifaces: []string{"up0"}, Forge: s.forge, Target: target})
	pinged, _ := clientProc.await(0, 60*time.Second, "ping over the announced address", ev("pinged"))
	clientProc.stop()
	return pinged
}

func runTopology(t *testing.T, tc topology) {
	s := buildSim(t, tc, 0)
	hostProc, id := s.startHost(t, tc, "")

	if tc.wantCert {
		cert, ci := hostProc.await(0, 90*time.Second, "certificate", ev("cert"))
		if _, ri := hostProc.await(0, time.Second, "the gate's public verdict", reach("public")); ri > ci {
			t.Errorf("%s: certificate loaded before the gate found the host public", tc.name)
		}
		pinged := s.dial(t, hostProc, 0, id, tc.externalIP)
		t.Logf("%s: %s", tc.name, pinged.Text)
		_, dialed := s.forgeState(t)
		checkDialBacks(t, dialed, tc.externalIP)
		t.Logf("%s: the broker dialled back %v", tc.name, dialed)
		if tc.autoNATv2 {
			// AutoNAT v2 must confirm the external TCP address too (the
			// gate may have passed on v1's word first).
			hostProc.await(0, 15*time.Second, "AutoNAT v2 confirming the TCP address", func(m msg) bool {
				return m.Ev == "v2" && slices.ContainsFunc(m.Addrs, func(a string) bool {
					return strings.Contains(a, "/"+tc.externalIP+"/tcp/")
				})
			})
		}
		logTimings(t, tc, hostProc, cert.MS)
		return
	}

	// Nothing may be sent: wait for the gate's verdict, then give it time
	// to change its mind (there is no event for "decided not to ask").
	switch {
	case tc.noPeers:
		v, _ := hostProc.await(0, 90*time.Second, "the gate's no-peers verdict", reach("no-peers"))
		t.Logf("%s: no-peers verdict at %.1f s", tc.name, float64(v.MS)/1000)
		wantLog(t, hostProc, "WARN", "no peer connected")
	case tc.autoNATv2:
		v, _ := hostProc.await(0, 90*time.Second, "the gate finding the TCP address unreachable", reach("unreachable"))
		t.Logf("%s: unreachable verdict at %.1f s for %v", tc.name, float64(v.MS)/1000, v.Addrs)
		wantLog(t, hostProc, "WARN", "AutoNAT cannot reach")
	default:
		v, _ := hostProc.await(0, 90*time.Second, "AutoNAT v1 verdict", func(m msg) bool { return m.Ev == "v1" && m.Text != "Unknown" })
		t.Logf("%s: AutoNAT v1 verdict at %.1f s: %s", tc.name, float64(v.MS)/1000, v.Text)
		wantLog(t, hostProc, "WARN", "AutoNAT v2 is turned off")
	}
	time.Sleep(5 * time.Second)
	if st := s.stats(t); st.Health+st.Challenge+st.CA > 0 {
		t.Errorf("%s: the host contacted the forge although it is not publicly reachable over TCP: %+v\nhost lines:\n%s", tc.name, st, hostProc.dump())
	}
	logTimings(t, tc, hostProc, -1)
}

// logTimings prints when AutoNAT confirmed reachability and when the
// certificate was served, in milliseconds since the host process started.
func logTimings(t *testing.T, tc topology, p *proc, certMS int64) {
	v1, v2, gate := int64(-1), int64(-1), int64(-1)
	for _, m := range p.lines() {
		if m.Ev == "reach" && m.Text == "public" && gate < 0 {
			gate = m.MS
		}
		if m.Ev == "v1" && m.Text == "Public" && v1 < 0 {
			v1 = m.MS
		}
		if m.Ev == "v2" && v2 < 0 {
			for _, a := range m.Addrs {
				if strings.Contains(a, "/tcp/") {
					v2 = m.MS
				}
			}
		}
	}
	f := func(ms int64) string {
		if ms < 0 {
			return "never"
		}
		return fmt.Sprintf("%.1f s", float64(ms)/1000)
	}
	t.Logf("timing %s: reachability confirmed (gate public) at %s, certificate served at %s; AutoNAT v2 confirmed a TCP address at %s, v1 public at %s (since the host process started)",
		tc.name, f(gate), f(certMS), f(v2), f(v1))
	if testing.Verbose() {
		for _, m := range p.lines() {
			switch m.Ev {
			case "log":
				t.Logf("host log %s: %s", m.Level, m.Text)
			case "v1", "v2", "reach", "cert", "expired", "failed", "announced":
				j, _ := json.Marshal(m)
				t.Logf("host event: %s", j)
			}
		}
	}
}
