package netsim_test

// The processes of a simulation. The test binary re-executes itself inside
// a namespace with NETSIM_ROLE and NETSIM_PARAMS set; TestMain sends it
// here. A role checks its isolation first, prints JSON lines (msg) on
// stdout, and stops when its standard input closes.

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/libp2p/go-libp2p/p2p/transport/websocket"
	ma "github.com/multiformats/go-multiaddr"
	madns "github.com/multiformats/go-multiaddr-dns"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/internal/netsim"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

const (
	roleEnv   = "NETSIM_ROLE"
	paramsEnv = "NETSIM_PARAMS"
)

// processStart is when this process started running Go code: the origin
// of the times a role reports.
var processStart = time.Now()

// msg is one line a role prints. Ev says which fields are set.
type msg struct {
	Ev      string           `json:"ev"`
	MS      int64            `json:"ms"` // since the process started
	Err     string           `json:"err,omitempty"`
	Text    string           `json:"text,omitempty"`
	Level   string           `json:"level,omitempty"`
	ID      string           `json:"id,omitempty"`
	Addrs   []string         `json:"addrs,omitempty"`
	Unreach []string         `json:"unreach,omitempty"`
	Forge   *forgeInfo       `json:"forge,omitempty"`
	Servers []string         `json:"servers,omitempty"`
	Stats   *testforge.Stats `json:"stats,omitempty"`
	Source  string           `json:"source,omitempty"`
	Dialed  [][]string       `json:"dialed,omitempty"` // the broker's dial-backs
}

// forgeInfo is what the host and the client need to know of the forge.
type forgeInfo struct {
	Domain, BrokerURL, CAURL, DNSAddr string
	CARootPEM, IssuerRootPEM          []byte
}

type coreParams struct {
	Ifaces       []string
	ForgeIP      string
	ServerIPs    [][]string // one list of addresses per AutoNAT server
	CertValidity time.Duration
}

type hostParams struct {
	Ifaces []string
	Listen []string
	Forge  forgeInfo
	Peers  []string // AutoNAT servers to connect to, /p2p included
	// NoAutoNATv2 turns the AutoNAT v2 client off after autotls.Option
	// turned it on: a host with AutoNAT v1 only.
	NoAutoNATv2 bool
	// StateDir, if set, keeps the identity key and the certificate
	// storage across runs of the host (a restart). Empty: in memory.
	StateDir string
}

type clientParams struct {
	Ifaces []string
	Forge  forgeInfo
	Target string // the announced WSS address, /p2p included
}

// out serializes the role's lines on stdout.
type out struct{ mu sync.Mutex }

func (o *out) send(m msg) {
	m.MS = time.Since(processStart).Milliseconds()
	b, _ := json.Marshal(m)
	o.mu.Lock()
	defer o.mu.Unlock()
	_, _ = os.Stdout.Write(append(b, '\n'))
}

// runRole runs the role named by NETSIM_ROLE and returns the exit code.
func runRole(role string) int {
	o := &out{}
	fail := func(err error) int {
		o.send(msg{Ev: "error", Err: err.Error()})
		return 1
	}
	// No proxy, whatever the environment says: every peer is simulated.
	for _, k := range []string{"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"} {
		_ = os.Unsetenv(k)
	}
	raw := []byte(os.Getenv(paramsEnv))
	var err error
	switch role {
	case "core":
		var p coreParams
		if err = json.Unmarshal(raw, &p); err == nil {
			err = runCore(o, p)
		}
	case "host":
		var p hostParams
		if err = json.Unmarshal(raw, &p); err == nil {
			err = runHost(o, p)
		}
	case "check":
		// Only the isolation check: it must refuse where the test made
		// the namespace unsafe on purpose.
		var ifaces []string
		if err = json.Unmarshal(raw, &ifaces); err == nil {
			if err = netsim.CheckIsolated(ifaces...); err == nil {
				o.send(msg{Ev: "isolated"})
			}
		}
	case "client":
		var p clientParams
		if err = json.Unmarshal(raw, &p); err == nil {
			err = runClient(o, p)
		}
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		return fail(err)
	}
	return 0
}

// simPrefixes are the only networks a role's libp2p hosts may dial or
// accept (besides loopback, which is the namespace's own).
func simPrefixes() []netip.Prefix { return []netip.Prefix{netsim.Prefix4, netsim.Prefix6} }

// commands returns the lines read from standard input; it is closed when
// the input ends (the test is done with this process).
func commands() <-chan string {
	c := make(chan string)
	go func() {
		defer close(c)
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			c <- sc.Text()
		}
	}()
	return c
}

// runCore runs the forge and the AutoNAT servers of the "internet".
func runCore(o *out, p coreParams) error {
	if err := netsim.CheckIsolated(p.Ifaces...); err != nil {
		return err
	}
	ip, err := netip.ParseAddr(p.ForgeIP)
	if err != nil {
		return err
	}
	f, err := testforge.Start(testforge.Config{
		ListenIP:         ip,
		DialBackPrefixes: simPrefixes(),
		CertValidity:     p.CertValidity,
	})
	if err != nil {
		return err
	}
	defer f.Close()

	var servers []string
	for _, ips := range p.ServerIPs {
		var listen []string
		for _, s := range ips {
			fam := "ip4"
			if strings.Contains(s, ":") {
				fam = "ip6"
			}
			listen = append(listen, fmt.Sprintf("/%s/%s/tcp/4001", fam, s), fmt.Sprintf("/%s/%s/udp/4001/quic-v1", fam, s))
		}
		// A plain public node serving AutoNAT v1 and v2, as most of the
		// public network does.
		h, err := libp2p.New(
			libp2p.ListenAddrStrings(listen...),
			libp2p.ConnectionGater(testforge.PrefixGater(simPrefixes()...)),
			libp2p.ForceReachabilityPublic(),
			libp2p.EnableNATService(),
			// Generous v1 limits: a few clients ask often here. (A zero
			// interval keeps the defaults; a zero per-peer limit refuses all.)
			libp2p.AutoNATServiceRateLimit(1000, 100, time.Minute),
			libp2p.EnableAutoNATv2(),
			libp2p.DisableRelay(),
			// No black-hole detection: a public node has dialled plenty
			// over UDP and IPv6 before, these have not, and AutoNAT v2
			// refuses to dial back where the detector is unsure.
			libp2p.UDPBlackHoleSuccessCounter(nil),
			libp2p.IPv6BlackHoleSuccessCounter(nil),
		)
		if err != nil {
			return fmt.Errorf("starting an AutoNAT server: %w", err)
		}
		defer h.Close()
		for _, a := range h.Addrs() {
			servers = append(servers, a.Encapsulate(ma.StringCast("/p2p/"+h.ID().String())).String())
		}
	}
	o.send(msg{Ev: "ready", Servers: servers, Forge: &forgeInfo{
		Domain: f.Domain, BrokerURL: f.BrokerURL, CAURL: f.CAURL, DNSAddr: f.DNSAddr,
		CARootPEM: f.CARootPEM, IssuerRootPEM: f.IssuerRootPEM,
	}})
	for cmd := range commands() {
		if cmd == "stats" {
			s := f.Stats()
			o.send(msg{Ev: "stats", Stats: &s, Dialed: f.DialBackAddrs()})
		}
	}
	return nil
}

// resolver sends every query to the forge's DNS server.
func (fi forgeInfo) resolver() *net.Resolver {
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, fi.DNSAddr)
		},
	}
}

func (fi forgeInfo) maResolver() (network.MultiaddrDNSResolver, error) {
	r, err := madns.NewResolver(madns.WithDefaultResolver(fi.resolver()))
	if err != nil {
		return nil, err
	}
	return swarm.ResolverFromMaDNS{Resolver: r}, nil
}

func pool(pemBytes []byte) (*x509.CertPool, error) {
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(pemBytes) {
		return nil, fmt.Errorf("no certificate in PEM")
	}
	return p, nil
}

// lineHandler prints the host's autotls log records as "log" lines.
type lineHandler struct {
	o     *out
	attrs []slog.Attr
}

func (lineHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }
func (h lineHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	for _, a := range h.attrs {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
	}
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	h.o.send(msg{Ev: "log", Level: r.Level.String(), Text: b.String()})
	return nil
}
func (h lineHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return lineHandler{h.o, append(slices.Clone(h.attrs), as...)}
}
func (h lineHandler) WithGroup(string) slog.Handler { return h }

// runHost runs the host under test in production configuration: no
// WithAllowPrivateAddrs, the forge's URLs, roots and resolver, AutoNAT.
func runHost(o *out, p hostParams) error {
	if err := netsim.CheckIsolated(p.Ifaces...); err != nil {
		return err
	}
	caRoots, err := pool(p.Forge.CARootPEM)
	if err != nil {
		return err
	}
	mr, err := p.Forge.maResolver()
	if err != nil {
		return err
	}
	store := storage.Memory()
	var identity []libp2p.Option
	if p.StateDir != "" {
		if store, err = storage.Dir(filepath.Join(p.StateDir, "certs")); err != nil {
			return err
		}
		key, err := loadOrCreateKey(filepath.Join(p.StateDir, "identity.key"))
		if err != nil {
			return err
		}
		identity = append(identity, libp2p.Identity(key))
	}
	opts := []libp2p.Option{
		libp2p.ListenAddrStrings(p.Listen...),
		libp2p.ConnectionGater(testforge.PrefixGater(simPrefixes()...)),
		libp2p.MultiaddrResolver(mr),
		autotls.Option(
			autotls.WithForgeDomain(p.Forge.Domain),
			autotls.WithRegistrationEndpoint(p.Forge.BrokerURL),
			autotls.WithCA(p.Forge.CAURL, caRoots),
			autotls.WithResolver(p.Forge.resolver()),
			autotls.WithStorage(store),
			autotls.WithLogger(slog.New(lineHandler{o: o})),
		),
	}
	if p.NoAutoNATv2 {
		opts = append(opts, func(cfg *libp2p.Config) error {
			cfg.EnableAutoNATv2 = false
			return nil
		})
	}
	opts = append(opts, identity...)
	h, err := libp2p.New(opts...)
	if err != nil {
		return err
	}
	defer h.Close()
	sub, err := h.EventBus().Subscribe([]any{
		new(event.EvtLocalReachabilityChanged),
		new(event.EvtHostReachableAddrsChanged),
		new(autotls.EvtCertificateLoaded),
		new(autotls.EvtCertificateExpired),
		new(autotls.EvtIssuanceFailed),
		new(autotls.EvtReachabilityChanged),
		new(event.EvtLocalAddressesUpdated),
	})
	if err != nil {
		return err
	}
	defer sub.Close()
	o.send(msg{Ev: "started", ID: h.ID().String(), Addrs: addrStrings(h.Addrs())})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for _, s := range p.Peers {
		ai, err := peer.AddrInfoFromString(s)
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := h.Connect(ctx, *ai); err != nil && ctx.Err() == nil {
				o.send(msg{Ev: "peer-error", Text: fmt.Sprintf("connecting to %s: %v", ai.ID, err)})
			}
		}()
	}

	cmds := commands()
	announced := false
	for {
		select {
		case _, ok := <-cmds:
			if !ok {
				return nil
			}
		case e := <-sub.Out():
			switch e := e.(type) {
			case event.EvtLocalReachabilityChanged:
				o.send(msg{Ev: "v1", Text: e.Reachability.String()})
			case event.EvtHostReachableAddrsChanged:
				o.send(msg{Ev: "v2", Addrs: addrStrings(e.Reachable), Unreach: addrStrings(e.Unreachable)})
			case autotls.EvtCertificateLoaded:
				o.send(msg{Ev: "cert", Source: string(e.Source), Text: fmt.Sprintf("%v until %s", e.Names, e.NotAfter.UTC().Format(time.RFC3339Nano))})
			case autotls.EvtCertificateExpired:
				o.send(msg{Ev: "expired", Text: e.NotAfter.UTC().Format(time.RFC3339Nano)})
			case autotls.EvtReachabilityChanged:
				o.send(msg{Ev: "reach", Text: string(e.Reachability), Addrs: addrStrings(e.Addrs)})
			case autotls.EvtIssuanceFailed:
				o.send(msg{Ev: "failed", Text: fmt.Sprintf("%+v", e)})
			case event.EvtLocalAddressesUpdated:
				o.send(msg{Ev: "addrs", Addrs: addrStrings(h.Addrs())})
				var wss []string
				for _, a := range h.Addrs() {
					if strings.Contains(a.String(), "/tls/sni/") && manet.IsPublicAddr(a) {
						wss = append(wss, a.String())
					}
				}
				if len(wss) > 0 != announced {
					announced = len(wss) > 0
					o.send(msg{Ev: "announced", Addrs: wss})
				}
			}
		}
	}
}

// loadOrCreateKey reads the host's identity from path, or makes one and
// writes it there: the same PeerID across restarts.
func loadOrCreateKey(path string) (crypto.PrivKey, error) {
	if b, err := os.ReadFile(path); err == nil {
		return crypto.UnmarshalPrivateKey(b)
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	key, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, err
	}
	b, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return key, os.WriteFile(path, b, 0o600)
}

func addrStrings(as []ma.Multiaddr) []string {
	var s []string
	for _, a := range as {
		s = append(s, a.String())
	}
	return s
}

// runClient is the browser's side: a plain libp2p client that dials the
// announced WSS address, trusting only the forge's issuing root and
// resolving only through the forge's DNS, and pings.
func runClient(o *out, p clientParams) error {
	if err := netsim.CheckIsolated(p.Ifaces...); err != nil {
		return err
	}
	roots, err := pool(p.Forge.IssuerRootPEM)
	if err != nil {
		return err
	}
	mr, err := p.Forge.maResolver()
	if err != nil {
		return err
	}
	h, err := libp2p.New(
		libp2p.NoListenAddrs,
		libp2p.ConnectionGater(testforge.PrefixGater(simPrefixes()...)),
		libp2p.MultiaddrResolver(mr),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Transport(quic.NewTransport),
		libp2p.Transport(websocket.New, websocket.WithTLSClientConfig(&tls.Config{RootCAs: roots})),
	)
	if err != nil {
		return err
	}
	defer h.Close()
	ai, err := peer.AddrInfoFromString(p.Target)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := h.Connect(ctx, *ai); err != nil {
		return fmt.Errorf("dialling %s: %w", p.Target, err)
	}
	conns := h.Network().ConnsToPeer(ai.ID)
	if len(conns) == 0 {
		return fmt.Errorf("connected to %s but no connection remains", ai.ID)
	}
	res := <-ping.Ping(ctx, h, ai.ID)
	if res.Error != nil {
		return fmt.Errorf("ping over %s: %w", conns[0].RemoteMultiaddr(), res.Error)
	}
	o.send(msg{Ev: "pinged", Text: fmt.Sprintf("rtt %v over %s", res.RTT, conns[0].RemoteMultiaddr()), Addrs: []string{conns[0].RemoteMultiaddr().String()}})
	_, _ = io.Copy(io.Discard, os.Stdin) // wait for the test to finish with us
	return nil
}
