// Package autotlstest runs a complete AutoTLS forge on loopback for the
// tests of applications that embed [autotls]: an ACME CA (Pebble), a
// registration broker that behaves like the public one (PeerID auth, a
// real libp2p dial-back), and the forge's DNS server. It is modelled on
// net/http/httptest: [New] gives a test a running forge and stops it when
// the test ends.
//
// Three lines give a host under test a certificate:
//
//	f := autotlstest.New(t)
//	h, _ := libp2p.New(append(f.HostOptions(), autotls.Option(f.Options()...))...)
//	addr := f.WaitBrowserAddr(t, h)
//
// A peer built with [Forge.PeerOptions] (or [Forge.NewPeer]) trusts only
// the forge's CA and dials addr over Secure WebSockets; a browser trusts
// the file [Forge.RootPEMFile] names. For a host that serves HTTP
// (autotls.WithHTTPHandler), [Forge.WaitHTTPAddr] waits for its /http
// address and [Forge.HTTPClient] fetches from it over HTTPS and HTTP/2. Methods such as [Forge.BrokerDown],
// [Forge.FailBroker], [Forge.DelayTXT], [Forge.RateLimitCA] and
// [Forge.RefuseDialBack] drive the forge into the failures an application
// should survive, and [WithCertValidity] makes certificates short-lived so
// that a renewal happens inside a test.
//
// Everything listens on 127.0.0.1 and resolves through the forge's DNS
// server, never the system's; hosts built with [Forge.HostOptions] refuse
// non-loopback connections. Nothing here is needed by a program that only
// imports autotls: Pebble and the DNS server are linked into tests that
// import this package.
package autotlstest

import (
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// DefaultWaitTimeout bounds the waits of [Forge.WaitBrowserAddr],
// [Forge.WaitHTTPAddr] and [Forge.WaitIssuanceFailed] unless [WithWaitTimeout] says otherwise.
const DefaultWaitTimeout = 30 * time.Second

// Option configures [New].
type Option func(*config)

type config struct {
	forge       testforge.Config
	waitTimeout time.Duration
}

// WithCertValidity makes the CA issue certificates valid for d, so that a
// renewal happens within the test: autotls renews a certificate this
// short-lived with half of its lifetime left. The CA counts whole seconds
// from the start of the second it issues in, so a certificate for 4s is
// valid for 3s from about a second ago. Without it, certificates are valid for 90 days, like Let's
// Encrypt's.
func WithCertValidity(d time.Duration) Option {
	return func(c *config) { c.forge.CertValidity = max(d, time.Second) }
}

// WithDomain sets the forge domain. Without it, the forge serves
// libp2p.direct (on loopback only: names under it never reach a real
// nameserver through the forge's resolver).
func WithDomain(domain string) Option {
	return func(c *config) { c.forge.Domain = domain }
}

// WithWaitTimeout bounds the waits of [Forge.WaitBrowserAddr],
// [Forge.WaitHTTPAddr] and [Forge.WaitIssuanceFailed]. Without it, they wait at most
// [DefaultWaitTimeout].
func WithWaitTimeout(d time.Duration) Option {
	return func(c *config) { c.waitTimeout = d }
}

// Forge is a running test forge. Its methods are safe for concurrent use;
// those that may fail a test (the ones given a testing.TB, and
// [Forge.BrokerDown], [Forge.BrokerUp] and [Forge.ClearFaults], which fail
// the test given to [New]) must be called from the goroutine running it,
// like tb.Fatal.
type Forge struct {
	tb          testing.TB
	f           *testforge.Forge
	ca          *testforge.CAProxy
	waitTimeout time.Duration
	faults      faults
	http        *http.Transport // of the clients HTTPClient returns

	mu    sync.Mutex
	hosts map[peer.ID]*record // hosts built with HostOptions, by identity
	open  map[*record]host.Host

	caRequests atomic.Int64
}

// New starts a forge on 127.0.0.1 and stops it when tb and its subtests
// have finished; the idle connections of [Forge.HTTPClient]'s clients,
// hosts built with [Forge.HostOptions] and given to one of the Wait
// methods, and peers from [Forge.NewPeer], that are still open, are
// closed first. If the forge cannot start, New fails tb with tb.Fatalf, so it must be called from the
// goroutine running the test.
//
// The CA is fronted by a proxy on loopback, through which every ACME
// request passes: it counts them and answers for the CA in
// [Forge.RateLimitCA].
func New(tb testing.TB, opts ...Option) *Forge {
	tb.Helper()
	c := config{waitTimeout: DefaultWaitTimeout}
	for _, o := range opts {
		o(&c)
	}
	f, err := start(tb, c)
	if err != nil {
		tb.Fatalf("autotlstest: %v", err)
	}
	tb.Cleanup(f.close)
	return f
}

// start starts a forge whose fault methods report to tb.
func start(tb testing.TB, c config) (*Forge, error) {
	tf, err := testforge.Start(c.forge)
	if err != nil {
		return nil, err
	}
	ca, err := tf.StartCAProxy()
	if err != nil {
		_ = tf.Close()
		return nil, fmt.Errorf("starting the CA's proxy: %w", err)
	}
	f := &Forge{
		tb:          tb,
		f:           tf,
		ca:          ca,
		waitTimeout: c.waitTimeout,
		hosts:       make(map[peer.ID]*record),
		open:        make(map[*record]host.Host),
	}
	f.http = f.newHTTPTransport()
	f.installFaults()
	return f, nil
}

// close closes the HTTP clients' idle connections and the hosts still
// open, then the CA's proxy, then the forge.
func (f *Forge) close() {
	f.http.CloseIdleConnections()
	f.closeHosts()
	f.ca.Close()
	if err := f.f.Close(); err != nil {
		f.tb.Errorf("autotlstest: closing the forge: %v", err)
	}
}

// Options returns the autotls options that point a host at the forge: its
// domain, broker, CA and the CA's roots, its resolver, private addresses
// allowed (everything is on loopback), and a new, empty in-memory
// storage. Options given after these override them: append
// autotls.WithStorage to keep a certificate across a host's restart.
func (f *Forge) Options() []autotls.Opt {
	return []autotls.Opt{
		autotls.WithStorage(storage.Memory()),
		autotls.WithForgeDomain(f.f.Domain),
		autotls.WithRegistrationEndpoint(f.f.BrokerURL),
		autotls.WithCA(f.ca.URL, f.ca.Roots),
		autotls.WithAllowPrivateAddrs(),
		autotls.WithResolver(f.f.Resolver()),
	}
}

// Roots returns the pool a client must trust to accept the certificates
// the forge issues: the CA's issuing root only.
func (f *Forge) Roots() *x509.CertPool { return f.f.IssuerRoots.Clone() }

// RootPEMFile writes the CA's issuing root, PEM encoded, into tb.TempDir()
// and returns its path, for a browser or a tool to trust.
func (f *Forge) RootPEMFile(tb testing.TB) string {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "autotlstest-root.pem")
	if err := os.WriteFile(path, f.f.IssuerRootPEM, 0o644); err != nil {
		tb.Fatalf("autotlstest: writing the root: %v", err)
	}
	return path
}

// Resolver returns a resolver that asks the forge's DNS server only, never
// the system's.
func (f *Forge) Resolver() *net.Resolver { return f.f.Resolver() }

// Domain returns the forge domain, such as "libp2p.direct".
func (f *Forge) Domain() string { return f.f.Domain }

// HostOptions returns the libp2p options for a host under test: listen on
// 127.0.0.1 only (TCP and QUIC, ports chosen by the system), refuse
// non-loopback connections (a connection gater), and resolve multiaddrs
// through the forge's DNS. They also record the host's autotls events from
// its start, for the Wait methods, and, once the host was given to one of
// them, have it closed when the test ends, before the forge stops (close
// other hosts yourself).
//
// They combine with autotls.Option and other options, but not with
// another libp2p.ConnectionGater (libp2p refuses two) or
// libp2p.MultiaddrResolver (the last wins); listen addresses given
// elsewhere are added to these.
func (f *Forge) HostOptions() []libp2p.Option {
	return append(f.f.HostOptions(), f.recordOption())
}

// PeerOptions returns the libp2p options for a peer that dials the host
// under test: no listen addresses, loopback only, multiaddrs resolved
// through the forge's DNS, and libp2p's default transports with a
// WebSocket transport that trusts only [Forge.Roots]. They set the
// transports: do not combine them with libp2p.Transport or
// libp2p.DefaultTransports.
func (f *Forge) PeerOptions() []libp2p.Option { return f.f.DialerOptions() }

// NewPeer returns a new host built with [Forge.PeerOptions] and opts,
// closed when the test ends. It fails tb if libp2p refuses the options.
func (f *Forge) NewPeer(tb testing.TB, opts ...libp2p.Option) host.Host {
	tb.Helper()
	h, err := libp2p.New(append(f.PeerOptions(), opts...)...)
	if err != nil {
		tb.Fatalf("autotlstest: starting a peer: %v", err)
	}
	tb.Cleanup(func() { _ = h.Close() })
	return h
}

// Stats counts the requests the forge has received since [New].
type Stats struct {
	// Broker counts requests to the broker: health checks and
	// registrations, PeerID-auth legs included; not connections refused
	// while it was down.
	Broker int
	// Registered counts the registrations the broker accepted.
	Registered int
	// CA counts requests to the ACME CA, those refused by
	// [Forge.RateLimitCA] included.
	CA int
	// DNS counts DNS queries; TXT those for _acme-challenge TXT records.
	DNS, TXT int
}

// Stats returns a snapshot of the forge's counters.
func (f *Forge) Stats() Stats {
	s := f.f.Stats()
	return Stats{
		Broker:     s.Health + s.Challenge,
		Registered: s.Registered,
		CA:         int(f.caRequests.Load()),
		DNS:        s.DNS,
		TXT:        s.DNSTXT,
	}
}
