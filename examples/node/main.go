// Command node runs a libp2p host that browsers can dial over Secure
// WebSockets, with a certificate obtained through autotls.
//
// By default it runs offline: an embedded local forge (an in-process ACME CA,
// broker and DNS server, all on 127.0.0.1) issues the certificate, and the
// node checks itself by dialing its own WSS address from a second host.
// With -production it uses libp2p.direct and Let's Encrypt, which needs a
// publicly reachable TCP port: it keeps its identity key in its data
// directory, and connects to the public libp2p bootstrap peers so that
// AutoNAT has peers to ask to confirm that port (production.go).
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

var start = time.Now()

// step prints a progress line with the time since start.
func step(format string, args ...any) {
	fmt.Printf("[%7.3fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
}

func main() {
	production := flag.Bool("production", false, "use libp2p.direct and Let's Encrypt (needs a publicly reachable TCP port)")
	port := flag.Int("port", 0, "TCP and UDP port to listen on (0: random locally, 4001 with -production)")
	dataDir := flag.String("datadir", "", "directory for the identity key and certificates with -production (default: the per-user data directory)")
	httpAddr := flag.String("http", "127.0.0.1:8080", "loopback address to serve the browser demo page on, if it is built (empty: off)")
	verbose := flag.Bool("v", false, "log debug details")
	metricsAddr := flag.String("metrics", "", "address to serve Prometheus metrics on, at /metrics (e.g. 127.0.0.1:9464; empty: off)")
	flag.Parse()

	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *metricsAddr != "" {
		srv, err := serveMetrics(*metricsAddr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		defer srv.Close()
	}

	var err error
	if *production {
		err = runProduction(ctx, logger, *port, *dataDir)
	} else {
		err = runLocal(ctx, logger, *port, *httpAddr)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

// runLocal runs the node against an embedded forge on loopback.
func runLocal(ctx context.Context, logger *slog.Logger, port int, httpAddr string) error {
	f, err := testforge.Start(testforge.Config{})
	if err != nil {
		return fmt.Errorf("starting the local forge: %w", err)
	}
	defer f.Close()
	step("local forge up on 127.0.0.1: ACME CA %s, broker %s, DNS %s", f.CAURL, f.BrokerURL, f.DNSAddr)

	rootFile := filepath.Join(os.TempDir(), "autotls-local-forge-root.pem")
	if err := os.WriteFile(rootFile, f.IssuerRootPEM, 0o644); err != nil {
		return fmt.Errorf("writing the local CA root: %w", err)
	}
	step("local CA root (trust it in a browser to dial the node): %s", rootFile)

	listen := []string{
		fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port),
		fmt.Sprintf("/ip4/127.0.0.1/udp/%d/quic-v1", port),
	}
	info := &infoHandler{agent: agent}
	h, err := libp2p.New(
		libp2p.UserAgent(agent),
		libp2p.ListenAddrStrings(listen...),
		libp2p.ConnectionGater(testforge.LoopbackGater()),
		autotls.Option(
			autotls.WithHTTPHandler(info), // HTTPS on the WSS port: see http.go
			autotls.WithForgeDomain(f.Domain),
			autotls.WithRegistrationEndpoint(f.BrokerURL),
			autotls.WithCA(f.CAURL, f.CARoots),
			autotls.WithResolver(f.Resolver()),
			autotls.WithStorage(storage.Memory()), // a fresh CA each run: nothing worth keeping
			autotls.WithAllowPrivateAddrs(),       // loopback is all there is here
			autotls.WithLogger(logger),
		),
	)
	if err != nil {
		return err
	}
	defer h.Close()
	defer followStatus(h)()
	info.set(h)
	step("host started: %s", h.ID())

	addrs, err := waitForCertificate(ctx, h)
	if err != nil {
		return err
	}
	printBrowserAddrs(h, addrs)

	if err := selfCheck(ctx, f, h, addrs[0]); err != nil {
		return fmt.Errorf("self-check: %w", err)
	}
	httpsURL, err := httpsCheck(ctx, h, f.IssuerRoots)
	if err != nil {
		return fmt.Errorf("HTTPS self-check: %w", err)
	}
	printHTTPAddrs(h, rootFile)

	if httpAddr != "" {
		if srv, pageURL := serveBrowserPage(httpAddr, addrs[0], h.ID(), httpsURL); srv != nil {
			defer srv.Close()
			step("browser demo: %s", pageURL)
			step("  Chromium must trust %s and map *.%s to 127.0.0.1, e.g.", rootFile, f.Domain)
			step("  --host-resolver-rules=\"MAP *.%s 127.0.0.1\" (see examples/browser/README.md)", f.Domain)
		}
	}
	step("serving; press Ctrl-C to stop")
	<-ctx.Done()
	step("stopping")
	return nil
}

// runProduction runs the node against libp2p.direct and Let's Encrypt.
func runProduction(ctx context.Context, logger *slog.Logger, port int, dataDir string) error {
	cfg, err := prodFlags.config(port, dataDir)
	if err != nil {
		return err
	}
	port, dataDir = cfg.port, cfg.dataDir
	key, err := loadOrCreateKey(filepath.Join(dataDir, "identity.key"))
	if err != nil {
		return err
	}
	store, err := storage.Dir(filepath.Join(dataDir, "certmagic"))
	if err != nil {
		return err
	}
	step("data directory: %s (keep it: Let's Encrypt issues 5 certificates per name per week)", dataDir)

	info := &infoHandler{agent: agent}
	h, err := libp2p.New(cfg.hostOptions(key, store, logger, info)...)
	if err != nil {
		return err
	}
	defer h.Close()
	info.set(h)
	defer followStatus(h)()
	step("host started: %s, listening on TCP and UDP port %d", h.ID(), port)
	defer cfg.keepPeers(ctx, h)() // AutoNAT needs peers to ask

	addrs, err := waitForCertificate(ctx, h)
	if err != nil {
		return err
	}
	printBrowserAddrs(h, addrs)
	printHTTPAddrs(h, "") // a browser trusts Let's Encrypt: no root file to give curl
	step("serving; press Ctrl-C to stop")
	<-ctx.Done()
	step("stopping")
	return nil
}

// waitForCertificate prints the manager's progress until a certificate is
// loaded and a browser address is announced, and returns those addresses.
func waitForCertificate(ctx context.Context, h host.Host) ([]ma.Multiaddr, error) {
	sub, err := h.EventBus().Subscribe([]any{
		new(autotls.EvtCertificateLoaded),
		new(autotls.EvtIssuanceFailed),
		new(event.EvtLocalReachabilityChanged),
	})
	if err != nil {
		return nil, err
	}
	defer sub.Close()
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case e := <-sub.Out():
			switch e := e.(type) {
			case autotls.EvtIssuanceFailed:
				step("certificate attempt %d failed (next try %s): %v", e.Attempt, e.NextRetry.Format(time.TimeOnly), e.Err)
			case event.EvtLocalReachabilityChanged:
				step("AutoNAT reachability: %s", e.Reachability)
			case autotls.EvtCertificateLoaded:
				step("certificate %s (%s), valid until %s", strings.Join(e.Names, ","), e.Source, e.NotAfter.Format(time.RFC3339))
				for i := 0; i < 100; i++ {
					if addrs := browserAddrs(h); len(addrs) > 0 {
						return addrs, nil
					}
					time.Sleep(20 * time.Millisecond)
				}
				return nil, errors.New("certificate loaded but no browser address announced")
			}
		}
	}
}

// followStatus prints a line each time the certificate manager enters
// another state, saying what it waits for, until the function it returns
// is called.
func followStatus(h host.Host) (stop func()) {
	sub, err := h.EventBus().Subscribe(new(autotls.EvtStatusChanged))
	if err != nil {
		step("cannot follow the certificate status: %v", err)
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		var last autotls.State
		for e := range sub.Out() {
			if s := e.(autotls.EvtStatusChanged).Status; s.State != last {
				last = s.State
				step("status %s", s)
			}
		}
	}()
	return func() { sub.Close(); <-done }
}

// serveMetrics serves the Prometheus metrics of the process (libp2p's
// and autotls's, registered with the default registerer) on addr.
func serveMetrics(addr string) (*http.Server, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("serving metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	step("metrics: http://%s/metrics", l.Addr())
	return srv, nil
}

func browserAddrs(h host.Host) []ma.Multiaddr {
	var out []ma.Multiaddr
	for _, a := range h.Addrs() {
		if _, err := a.ValueForProtocol(ma.P_SNI); err == nil && a[len(a)-1].Code() == ma.P_WS {
			out = append(out, a)
		}
	}
	return out
}

// shortForm turns /ipX/<ip>/tcp/<port>/tls/sni/<name>/ws into
// /dnsX/<name>/tcp/<port>/tls/ws, the form that needs a DNS lookup.
func shortForm(a ma.Multiaddr) (ma.Multiaddr, bool) {
	name, err := a.ValueForProtocol(ma.P_SNI)
	if err != nil {
		return nil, false
	}
	port, err := a.ValueForProtocol(ma.P_TCP)
	if err != nil {
		return nil, false
	}
	dns := "dns4"
	if _, err := a.ValueForProtocol(ma.P_IP6); err == nil {
		dns = "dns6"
	}
	s, err := ma.NewMultiaddr(fmt.Sprintf("/%s/%s/tcp/%s/tls/ws", dns, name, port))
	return s, err == nil
}

func printBrowserAddrs(h host.Host, addrs []ma.Multiaddr) {
	step("browser-dialable addresses:")
	for _, a := range addrs {
		fmt.Printf("    %s/p2p/%s\n", a, h.ID())
		if s, ok := shortForm(a); ok {
			fmt.Printf("    %s/p2p/%s\n", s, h.ID())
		}
	}
}

// selfCheck dials the node's WSS address from a second host that trusts
// only the local CA, and pings.
func selfCheck(ctx context.Context, f *testforge.Forge, h host.Host, addr ma.Multiaddr) error {
	d, err := libp2p.New(f.DialerOptions()...)
	if err != nil {
		return err
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := d.Connect(ctx, peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{addr}}); err != nil {
		return fmt.Errorf("dialing %s: %w", addr, err)
	}
	res := <-ping.Ping(network.WithAllowLimitedConn(ctx, "selfcheck"), d, h.ID())
	if res.Error != nil {
		return fmt.Errorf("ping: %w", res.Error)
	}
	step("self-check: a second host dialed %s over WSS and pinged in %v", addr, res.RTT.Round(time.Microsecond))
	return nil
}

// serveBrowserPage serves examples/browser/dist on a loopback address, if
// the page has been built.
func serveBrowserPage(addr string, target ma.Multiaddr, id peer.ID, httpsURL string) (*http.Server, string) {
	_, file, _, _ := runtime.Caller(0)
	dist := filepath.Join(filepath.Dir(file), "..", "browser", "dist")
	if _, err := os.Stat(filepath.Join(dist, "index.html")); err != nil {
		step("browser demo not built (run: bash .ci/browser-setup.sh); skipping it")
		return nil, ""
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil || !net.ParseIP(host).IsLoopback() {
		step("refusing to serve the demo page on %q: loopback addresses only", addr)
		return nil, ""
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		step("cannot serve the browser demo on %s: %v", addr, err)
		return nil, ""
	}
	srv := &http.Server{Handler: http.FileServer(http.Dir(dist)), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	page := fmt.Sprintf("http://%s/?ma=%s&http=%s", l.Addr(), url.QueryEscape(fmt.Sprintf("%s/p2p/%s", target, id)), url.QueryEscape(httpsURL))
	return srv, page
}

// loadOrCreateKey keeps the node's identity across restarts: the
// certificate name is derived from it.
func loadOrCreateKey(path string) (crypto.PrivKey, error) {
	raw, err := os.ReadFile(path)
	if err == nil {
		k, err := crypto.UnmarshalPrivateKey(raw)
		if err != nil {
			return nil, fmt.Errorf("reading the identity key %s: %w", path, err)
		}
		return k, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("reading the identity key: %w", err)
	}
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, err
	}
	raw, err = crypto.MarshalPrivateKey(k)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", filepath.Dir(path), err)
	}
	// Written aside and renamed, so that a crash never leaves half a key
	// (which the next start would refuse rather than replace).
	tmp := path + ".new"
	if err := os.WriteFile(tmp, raw, 0o600); err != nil {
		return nil, fmt.Errorf("writing the identity key: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return nil, fmt.Errorf("writing the identity key: %w", err)
	}
	step("new identity key written to %s", path)
	return k, nil
}
