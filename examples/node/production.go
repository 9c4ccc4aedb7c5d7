package main

// The -production mode's settings and peers: the flags it adds, the host
// options they give, and the bootstrap peers AutoNAT needs.

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/storage"
)

// defaultBootstrapPeers are the public libp2p bootstrap peers: the list of
// DefaultBootstrapPeers in github.com/libp2p/go-libp2p-kad-dht
// (dht_bootstrap.go), which Kubo uses as well. Kept here rather than
// importing the DHT for one list: the node needs peers only so that
// AutoNAT has someone to ask to dial it back.
var defaultBootstrapPeers = []string{
	"/dnsaddr/bootstrap.libp2p.io/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
	"/dnsaddr/bootstrap.libp2p.io/p2p/QmQCU2EcMqAqQPR2i9bChDtGNJchTbq5TbXJJ16u19uLTa",
	"/dnsaddr/bootstrap.libp2p.io/p2p/QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb",
	"/dnsaddr/bootstrap.libp2p.io/p2p/QmcZf59bWwK5XFi76CZX8cbJ4BhTzzA3gU1ZjYZcYW3dwt",
	"/ip4/104.131.131.82/tcp/4001/p2p/QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ", // mars.i.ipfs.io
}

// prodFlags are the flags of -production besides -port and -datadir.
var prodFlags = newProductionFlags(flag.CommandLine)

type productionFlags struct {
	bootstrap *string
	public    *bool
}

func newProductionFlags(fs *flag.FlagSet) productionFlags {
	return productionFlags{
		bootstrap: fs.String("bootstrap", "", "with -production: comma-separated /p2p multiaddrs of the peers to connect to, whom AutoNAT asks to dial this node back (default: the public libp2p bootstrap peers; \"none\": none)"),
		public:    fs.Bool("public", false, "with -production: this machine has a public IP address and its TCP port is open; skip waiting for AutoNAT to say so (libp2p.ForceReachabilityPublic)"),
	}
}

// prodConfig is what -production runs with.
type prodConfig struct {
	port      int
	dataDir   string // identity.key and certmagic/ in it
	bootstrap []peer.AddrInfo
	public    bool
}

// config resolves the flags into a prodConfig: port 0 is 4001, an empty
// data directory the per-user one.
func (f productionFlags) config(port int, dataDir string) (prodConfig, error) {
	c := prodConfig{port: port, dataDir: dataDir, public: *f.public}
	if c.port == 0 {
		c.port = 4001
	}
	if c.port < 0 || c.port > 65535 {
		return prodConfig{}, fmt.Errorf("-port %d: want a TCP port, 1 to 65535", port)
	}
	if c.dataDir == "" {
		d, err := storage.DefaultDir()
		if err != nil {
			return prodConfig{}, fmt.Errorf("finding a data directory (give one with -datadir): %w", err)
		}
		c.dataDir = d
	}
	list := defaultBootstrapPeers
	switch b := strings.TrimSpace(*f.bootstrap); b {
	case "":
	case "none":
		list = nil
	default:
		list = strings.Split(b, ",")
	}
	var err error
	if c.bootstrap, err = parsePeers(list); err != nil {
		return prodConfig{}, fmt.Errorf("-bootstrap: %w", err)
	}
	return c, nil
}

// parsePeers parses /p2p multiaddrs into one AddrInfo per peer.
func parsePeers(list []string) ([]peer.AddrInfo, error) {
	var addrs []ma.Multiaddr
	for _, s := range list {
		a, err := ma.NewMultiaddr(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("%q: %w", s, err)
		}
		addrs = append(addrs, a)
	}
	infos, err := peer.AddrInfosFromP2pAddrs(addrs...)
	if err != nil {
		return nil, fmt.Errorf("want multiaddrs ending in /p2p/<peer id>: %w", err)
	}
	return infos, nil
}

// hostOptions are the libp2p options of the production node.
func (c prodConfig) hostOptions(key crypto.PrivKey, store certmagic.Storage, logger *slog.Logger, info http.Handler) []libp2p.Option {
	opts := []libp2p.Option{
		libp2p.Identity(key),
		libp2p.UserAgent(agent),
		libp2p.ListenAddrStrings(
			fmt.Sprintf("/ip4/0.0.0.0/tcp/%d", c.port),
			fmt.Sprintf("/ip6/::/tcp/%d", c.port),
			fmt.Sprintf("/ip4/0.0.0.0/udp/%d/quic-v1", c.port),
			fmt.Sprintf("/ip6/::/udp/%d/quic-v1", c.port),
		),
		libp2p.NATPortMap(),      // ask the router (UPnP / NAT-PMP) to forward the port
		libp2p.EnableAutoNATv2(), // a verdict per address: TCP's, not QUIC's
		autotls.Option(autotls.WithStorage(store), autotls.WithLogger(logger),
			autotls.WithHTTPHandler(info)), // HTTPS on the WSS port: see http.go
	}
	if c.public {
		opts = append(opts, libp2p.ForceReachabilityPublic())
	}
	return opts
}

// keepPeers connects h to the bootstrap peers in the background, says how
// that went and what the node waits for next, and connects again whenever
// the node has no peer left. The function it returns stops it and waits.
func (c prodConfig) keepPeers(ctx context.Context, h host.Host) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		c.connectLoop(ctx, h)
	}()
	go func() {
		defer wg.Done()
		reportReachableAddrs(ctx, h)
	}()
	return func() { cancel(); wg.Wait() }
}

func (c prodConfig) connectLoop(ctx context.Context, h host.Host) {
	if len(c.bootstrap) == 0 {
		step("no bootstrap peers (-bootstrap none): AutoNAT can only ask the peers that connect to this node")
		return
	}
	step("connecting to %d bootstrap peers: AutoNAT asks connected peers to dial TCP port %d back", len(c.bootstrap), c.port)
	tick := time.NewTicker(time.Minute)
	defer tick.Stop()
	for first := true; ; {
		n, err := connectAll(ctx, h, c.bootstrap)
		switch {
		case ctx.Err() != nil:
			return
		case n == 0:
			step("no bootstrap peer reachable (%v): AutoNAT has no one to ask; check this machine's outbound connections, or give peers with -bootstrap", err)
		case first && c.public:
			step("connected to %d of %d bootstrap peers; -public: reachability forced public, the broker's dial-back is the only check of TCP port %d", n, len(c.bootstrap), c.port)
			first = false
		case first:
			step("connected to %d of %d bootstrap peers; waiting for AutoNAT to confirm a public TCP address (a few minutes at most); if it finds TCP port %d unreachable, forward it to this machine or enable UPnP on the router", n, len(c.bootstrap), c.port)
			first = false
		default:
			step("connected to %d of %d bootstrap peers again", n, len(c.bootstrap))
		}
		// Connect again once the node has no peer left.
		for len(h.Network().Peers()) > 0 {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// connectAll connects to every peer at once, each within 30 s, and
// returns how many it reached and the last error.
func connectAll(ctx context.Context, h host.Host, peers []peer.AddrInfo) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var (
		mu      sync.Mutex
		n       int
		lastErr error
		wg      sync.WaitGroup
	)
	for _, p := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := h.Connect(ctx, p)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				lastErr = err
				return
			}
			n++
		}()
	}
	wg.Wait()
	return n, lastErr
}

// reportReachableAddrs prints AutoNAT v2's verdicts on the node's
// addresses as they change.
func reportReachableAddrs(ctx context.Context, h host.Host) {
	sub, err := h.EventBus().Subscribe(new(event.EvtHostReachableAddrsChanged))
	if err != nil {
		return
	}
	defer sub.Close()
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-sub.Out():
			if !ok {
				return
			}
			ev := e.(event.EvtHostReachableAddrsChanged)
			step("AutoNAT v2: reachable %v; unreachable %v", ev.Reachable, ev.Unreachable)
		}
	}
}
