// Package testforge runs a complete AutoTLS forge in-process, on loopback:
// an ACME CA (Pebble), a registration broker that behaves like the public
// p2p-forge broker (PeerID auth, strict request checks, a real libp2p
// dial-back), and an authoritative DNS server for the forge domain.
//
// It is the model of net/http/httptest applied to the forge: [New] gives a
// test a running forge with its URLs, roots and a resolver, and stops all of
// it when the test ends; [Start] and [Forge.Close] do the same for programs
// that are not tests (the offline example). By default it listens on and
// talks to 127.0.0.1 only; [Config.ListenIP] and [Config.DialBackPrefixes]
// move it into a simulated network (network namespaces a test creates). It
// never resolves through the system resolver.
//
// It does not implement the public broker's denylist, its metrics, or the
// static zone records (NS, CAA, MX, ...) of the production forge.
package testforge

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/miekg/dns"
	"github.com/multiformats/go-multibase"
)

// DefaultDomain is the forge domain used when [Config.Domain] is empty.
const DefaultDomain = "libp2p.direct"

// Config configures a [Forge]. The zero value is a forge for libp2p.direct
// with Pebble's default certificate validity, no injected CA faults, and no
// access token.
type Config struct {
	// Domain is the forge domain. Empty means [DefaultDomain].
	Domain string

	// AccessToken, if non-empty, makes the broker require the header
	// Forge-Authorization to equal it (403 otherwise), like the public
	// broker's FORGE_ACCESS_TOKEN.
	AccessToken string

	// CertValidity is the validity of issued certificates, rounded up to
	// whole seconds (Pebble's granularity; Pebble sets NotAfter to
	// NotBefore + validity - 1s). Zero means Pebble's default, 90 days.
	CertValidity time.Duration

	// Profiles, if not nil, are the ACME profiles Pebble offers in its
	// directory (meta.profiles), by name, with the validity of each
	// (rounded up to whole seconds; zero means CertValidity). Nil means
	// two profiles, "default" and "shortlived", both of CertValidity.
	// Pebble gives an order that names no profile one at random, so with
	// profiles of different validities a test should name one. At least
	// one profile is needed.
	Profiles map[string]time.Duration

	// NonceRejectPercent is the percentage of valid nonces Pebble rejects
	// with badNonce (PEBBLE_WFE_NONCEREJECT). Zero means none.
	NonceRejectPercent int

	// AuthzReusePercent is the percentage chance that Pebble reuses a valid
	// authorization for a new order (PEBBLE_AUTHZREUSE). Zero means never,
	// so every order needs a fresh DNS-01 challenge.
	AuthzReusePercent int

	// RetryAfterAuthz and RetryAfterOrder are the seconds Pebble puts in
	// Retry-After when an authorization or an order is polled. Zero means
	// no Retry-After header.
	RetryAfterAuthz, RetryAfterOrder int

	// Logger receives the forge's logs, Pebble's included (at debug level).
	// Nil discards them.
	Logger *slog.Logger

	// ListenIP is the address the DNS server, Pebble and the broker listen
	// on; the ACME endpoint's certificate names it. The zero value means
	// 127.0.0.1. Anything else belongs only inside a network namespace the
	// test created, with no route out (internal/netsim).
	ListenIP netip.Addr

	// DialBackPrefixes are the networks the broker's dial-back may reach,
	// besides loopback. Nil means loopback only.
	DialBackPrefixes []netip.Prefix
}

// listenIP is the address the forge's servers listen on.
func (c Config) listenIP() netip.Addr {
	if c.ListenIP.IsValid() {
		return c.ListenIP.Unmap()
	}
	return netip.AddrFrom4([4]byte{127, 0, 0, 1})
}

// newServer returns an unstarted test server listening on ip (any port),
// logging its errors (e.g. TLS handshake failures) at debug.
func newServer(ip netip.Addr, h http.Handler, logger *slog.Logger) (*httptest.Server, error) {
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, 0).String())
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", ip, err)
	}
	return &httptest.Server{
		Listener: ln,
		Config: &http.Server{
			Handler:           h,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
			ReadHeaderTimeout: time.Minute,
		},
	}, nil
}

// Forge is a running test forge. Its exported fields are set by [New] or
// [Start] and must not be modified. Its methods are safe for concurrent use.
type Forge struct {
	// Domain is the normalized forge domain (lower case, no trailing dot).
	Domain string
	// BrokerURL is the registration endpoint, "http://127.0.0.1:<port>"
	// (the address is [Config.ListenIP] when set, here and below).
	// Clients append /v1/health and /v1/_acme-challenge. PeerID auth
	// accepts only this exact host (with its port) as the hostname.
	BrokerURL string
	// CAURL is Pebble's ACME directory, "https://127.0.0.1:<port>/dir".
	CAURL string
	// CARoots trusts the TLS certificate of Pebble's HTTPS endpoint; give
	// it to the ACME client. [Forge.CAClient] is a ready-made client.
	CARoots *x509.CertPool
	// CARootPEM is the certificate in CARoots, PEM encoded, for programs
	// that take the CA's roots from a file.
	CARootPEM []byte
	// IssuerRoots trusts Pebble's issuing root: use it to verify issued
	// leaves and to dial a WSS listener that serves one.
	IssuerRoots *x509.CertPool
	// IssuerRootPEM is the issuing root, PEM encoded.
	IssuerRootPEM []byte
	// DNSAddr is the DNS server's address, "127.0.0.1:<port>", UDP and TCP.
	DNSAddr string

	log      *slog.Logger
	cfg      Config
	store    *txtStore
	stats    counters
	resolver *net.Resolver

	pebble *pebble
	broker *broker
	dns    *dnsServer

	brokerFault atomic.Pointer[func(http.ResponseWriter, *http.Request) bool]
	dnsFault    atomic.Pointer[func(dns.Question) DNSFault]
	dialFault   atomic.Pointer[func(peer.ID, []string) error]

	dialedMu sync.Mutex
	dialed   [][]string // the addresses of each dial-back, in order

	ctx       context.Context // canceled by Close: aborts dial-backs and DNS delays
	cancel    context.CancelFunc
	closeOnce sync.Once
	closeErr  error
}

// Stats counts the requests a [Forge] has received since it started.
type Stats struct {
	Health     int // requests to /v1/health
	Challenge  int // requests to /v1/_acme-challenge, PeerID-auth legs included
	Registered int // successful registrations (200)
	CA         int // requests to the ACME endpoint
	DNS        int // DNS queries received (UDP and TCP)
	DNSTXT     int // TXT queries for _acme-challenge names
}

type counters struct {
	health, challenge, registered, ca, dns, dnsTXT atomic.Int64
}

// DNSFault is what a fault hook set with [Forge.SetDNSFault] does to one
// query. The zero value answers normally.
type DNSFault struct {
	Drop    bool          // send no answer at all
	Delay   time.Duration // answer this late (cut short by Close)
	HideTXT bool          // answer _acme-challenge TXT as if nothing were stored
}

// New starts a forge on 127.0.0.1 (or [Config.ListenIP]) for a test or benchmark, like [Start],
// and closes it when tb and all its subtests have finished, reporting an
// error from [Forge.Close] with tb.Errorf. If the forge cannot start, New
// fails tb with tb.Fatalf; like tb.Fatal, it must therefore be called from
// the goroutine running the test (use [Start] from other goroutines).
// Closing the forge earlier with [Forge.Close] is allowed.
func New(tb testing.TB, cfg Config) *Forge {
	tb.Helper()
	f, err := Start(cfg)
	if err != nil {
		tb.Fatalf("%v", err) // Start's errors say "testforge: ..."
	}
	tb.Cleanup(func() {
		if err := f.Close(); err != nil {
			tb.Errorf("testforge: closing the forge: %v", err)
		}
	})
	return f
}

// Start starts a forge on 127.0.0.1 (or [Config.ListenIP]): the DNS server, Pebble and the broker.
// Call [Forge.Close] when done. Tests use [New], which closes the forge
// with the test.
func Start(cfg Config) (*Forge, error) {
	domain, err := normalizeDomain(cfg.Domain)
	if err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	f := &Forge{
		Domain: domain,
		log:    logger,
		cfg:    cfg,
		store:  newTXTStore(),
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())

	f.dns, err = startDNS(f)
	if err != nil {
		f.cancel()
		return nil, fmt.Errorf("testforge: starting DNS server: %w", err)
	}
	f.DNSAddr = f.dns.addr
	f.resolver = &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, f.DNSAddr)
		},
	}

	f.pebble, err = startPebble(cfg, f.DNSAddr, logger.With("component", "pebble"), &f.stats.ca)
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("testforge: starting Pebble: %w", err)
	}
	f.CAURL = f.pebble.directoryURL
	f.CARoots = f.pebble.caRoots
	f.CARootPEM = f.pebble.caRootPEM
	f.IssuerRoots = f.pebble.issuerRoots
	f.IssuerRootPEM = f.pebble.issuerRootPEM

	f.broker, err = startBroker(f)
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("testforge: starting broker: %w", err)
	}
	f.BrokerURL = f.broker.url

	f.log.Debug("test forge started", "domain", f.Domain, "broker", f.BrokerURL, "ca", f.CAURL, "dns", f.DNSAddr)
	return f, nil
}

// Close stops every server and goroutine the forge started and waits for
// them. It is safe to call more than once.
func (f *Forge) Close() error {
	f.closeOnce.Do(func() {
		f.cancel()
		var errs []error
		// Broker first: its handlers dial back, aborted by f.cancel.
		if f.broker != nil {
			f.broker.close()
		}
		// The CA before DNS: once no ACME request can arrive, nothing
		// new reaches the VA, and its in-flight lookups end promptly
		// whether DNS answers or not.
		if f.pebble != nil {
			f.pebble.close()
		}
		if f.dns != nil {
			errs = append(errs, f.dns.close())
		}
		f.closeErr = errors.Join(errs...)
	})
	return f.closeErr
}

// Resolver returns a pure-Go resolver that sends every query to the forge's
// DNS server, never to the system's.
func (f *Forge) Resolver() *net.Resolver { return f.resolver }

// Stats returns a snapshot of the forge's counters.
func (f *Forge) Stats() Stats {
	return Stats{
		Health:     int(f.stats.health.Load()),
		Challenge:  int(f.stats.challenge.Load()),
		Registered: int(f.stats.registered.Load()),
		CA:         int(f.stats.ca.Load()),
		DNS:        int(f.stats.dns.Load()),
		DNSTXT:     int(f.stats.dnsTXT.Load()),
	}
}

// TXT returns the challenge value currently stored for id, as the DNS server
// would serve it.
func (f *Forge) TXT(id peer.ID) (string, bool) { return f.store.get(id) }

// SetTXT stores value for id as a successful registration would, without the
// broker (no auth, no checks, no dial-back, not counted in [Stats]).
func (f *Forge) SetTXT(id peer.ID, value string) { f.store.set(id, value) }

// SetBrokerFault installs fn, called for every broker request after it is
// counted and before it is handled. If fn returns true it has written the
// response and normal handling is skipped. Nil removes the hook.
func (f *Forge) SetBrokerFault(fn func(w http.ResponseWriter, r *http.Request) bool) {
	if fn == nil {
		f.brokerFault.Store(nil)
		return
	}
	f.brokerFault.Store(&fn)
}

// SetDNSFault installs fn, called for every DNS query after it is counted;
// the [DNSFault] it returns is applied to that query. Nil removes the hook.
func (f *Forge) SetDNSFault(fn func(q dns.Question) DNSFault) {
	if fn == nil {
		f.dnsFault.Store(nil)
		return
	}
	f.dnsFault.Store(&fn)
}

// PeerLabel returns the DNS label of id: its CIDv1 (libp2p-key) in base36.
func PeerLabel(id peer.ID) string {
	s, err := peer.ToCid(id).StringOfBase(multibase.Base36)
	if err != nil {
		// Base36 is a known encoding: this cannot fail.
		panic(err)
	}
	return s
}

// CertName returns the certificate name for id under the forge,
// "*.<b36 peer id>.<domain>".
func (f *Forge) CertName(id peer.ID) string {
	return "*." + PeerLabel(id) + "." + f.Domain
}

// CAClient returns a new HTTP client for the ACME endpoint, trusting
// [Forge.CARoots] only.
func (f *Forge) CAClient() *http.Client { return f.pebble.client() }

func normalizeDomain(d string) (string, error) {
	d = strings.TrimSuffix(strings.ToLower(strings.TrimSpace(d)), ".")
	if d == "" {
		return DefaultDomain, nil
	}
	if _, ok := dns.IsDomainName(d); !ok || strings.Contains(d, "..") {
		return "", fmt.Errorf("testforge: invalid forge domain %q", d)
	}
	return d, nil
}

// quietHandler demotes records below warning to debug: the forge's parts
// (Pebble, the ACME client of IssueDirect) log their happy path at info,
// which is noise to a test.
type quietHandler struct{ inner slog.Handler }

func quiet(l *slog.Logger) *slog.Logger { return slog.New(quietHandler{l.Handler()}) }

func demote(l slog.Level) slog.Level {
	if l < slog.LevelWarn {
		return slog.LevelDebug
	}
	return l
}

func (h quietHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.inner.Enabled(ctx, demote(l))
}

func (h quietHandler) Handle(ctx context.Context, r slog.Record) error {
	r.Level = demote(r.Level)
	return h.inner.Handle(ctx, r)
}

func (h quietHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return quietHandler{h.inner.WithAttrs(attrs)}
}

func (h quietHandler) WithGroup(name string) slog.Handler {
	return quietHandler{h.inner.WithGroup(name)}
}
