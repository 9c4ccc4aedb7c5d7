package autotlstest

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	ma "github.com/multiformats/go-multiaddr"
)

// WaitHTTPAddr waits until h, a host built with autotls.WithHTTPHandler,
// announces an address for HTTPS clients,
// /ipX/.../tls/sni/<ip>.<peerid>.<forge>/http (or the /dnsX/.../tls/http
// form with autotls.WithShortAddrs), and returns it; [HTTPURL] turns it
// into the URL [Forge.HTTPClient] fetches. It fails tb as
// [Forge.WaitBrowserAddr] does if none comes within the wait's bound, and
// says so when h announces a browser address but no /http one (h was
// built without autotls.WithHTTPHandler).
func (f *Forge) WaitHTTPAddr(tb testing.TB, h host.Host) ma.Multiaddr {
	tb.Helper()
	return f.waitAddr(tb, h, "/http address", f.isHTTPAddr, func() string {
		if ws := f.firstAddr(h, f.isBrowserAddr); ws != nil {
			return fmt.Sprintf(", though it announces the browser address %s: serve HTTP with autotls.WithHTTPHandler, which announces the /http addresses", ws)
		}
		return ""
	})
}

// HTTPClient returns an HTTPS client for the hosts under test: it trusts
// only [Forge.Roots], resolves names under the forge's domain through the
// forge's DNS and refuses other names, uses no proxy, dials loopback
// addresses only, and speaks HTTP/2 to servers that offer it (hosts built
// with autotls.WithHTTPHandler do), HTTP/1.1 to others. So a test can
// fetch from a host by the name on its certificate:
//
//	resp, err := f.HTTPClient().Get(autotlstest.HTTPURL(t, f.WaitHTTPAddr(t, h)) + "/hello")
//
// Each call returns a new client; all share one transport, whose idle
// connections are closed when the test given to [New] ends, before the
// hosts are. The client has no overall timeout: bound a request with its
// context (http.NewRequestWithContext(t.Context(), ...)) or the client's
// Timeout.
func (f *Forge) HTTPClient() *http.Client { return &http.Client{Transport: f.http} }

// newHTTPTransport returns the transport of the clients
// [Forge.HTTPClient] returns.
func (f *Forge) newHTTPTransport() *http.Transport {
	d := &net.Dialer{Timeout: 10 * time.Second, Resolver: f.f.Resolver(), Control: loopbackOnly}
	return &http.Transport{
		Proxy: nil, // never HTTP_PROXY and the like
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			name, _, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			if _, err := netip.ParseAddr(name); err != nil && !f.isForgeName(name) {
				return nil, fmt.Errorf("autotlstest: the forge's HTTP client resolves names under %s only, not %s", f.f.Domain, name)
			}
			return d.DialContext(ctx, network, addr)
		},
		TLSClientConfig:     &tls.Config{RootCAs: f.Roots(), MinVersion: tls.VersionTLS12},
		ForceAttemptHTTP2:   true, // a custom dialer and TLS config turn HTTP/2 off without it
		TLSHandshakeTimeout: 10 * time.Second,
		IdleConnTimeout:     30 * time.Second,
	}
}

// loopbackOnly is the HTTP client's net.Dialer.Control: it refuses every
// address outside loopback, whatever a name resolved to.
func loopbackOnly(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil || !ap.Addr().IsLoopback() {
		return fmt.Errorf("autotlstest: the forge's HTTP client dials loopback only, not %s", address)
	}
	return nil
}

// HTTPURL returns the URL for an /http address a host announces, as
// [Forge.WaitHTTPAddr] returns it: https://<name>:<port> for
// /ipX/<ip>/tcp/<port>/tls/sni/<name>/http and for
// /dnsX/<name>/tcp/<port>/tls/http, the name on the host's certificate,
// which [Forge.HTTPClient] resolves through the forge's DNS. A trailing
// /p2p/<id> is ignored. It fails tb if a is not such an address.
func HTTPURL(tb testing.TB, a ma.Multiaddr) string {
	tb.Helper()
	u, err := httpURL(a)
	if err != nil {
		tb.Fatalf("autotlstest: HTTPURL(%s): %v", a, err)
	}
	return u
}

// httpURL is HTTPURL's work.
func httpURL(a ma.Multiaddr) (string, error) {
	var name, port string
	var isTLS, isHTTP bool
	for _, c := range a {
		if isHTTP && c.Code() != ma.P_P2P {
			return "", fmt.Errorf("%s after /http: want an address that ends in /http (or /http/p2p/<id>)", c.Protocol().Name)
		}
		switch c.Code() {
		case ma.P_IP4, ma.P_IP6, ma.P_DNS, ma.P_DNS4, ma.P_DNS6:
			if name == "" {
				name = c.Value()
			}
		case ma.P_TCP:
			port = c.Value()
		case ma.P_TLS:
			isTLS = true
		case ma.P_SNI:
			name = c.Value() // the certificate's name, not the IP
		case ma.P_HTTP:
			isHTTP = true
		case ma.P_P2P:
		default:
			return "", fmt.Errorf("unexpected /%s: want /ipX/<ip>/tcp/<port>/tls/sni/<name>/http or /dnsX/<name>/tcp/<port>/tls/http", c.Protocol().Name)
		}
	}
	if name == "" || port == "" || !isTLS || !isHTTP {
		return "", fmt.Errorf("not an HTTPS address: want /ipX/<ip>/tcp/<port>/tls/sni/<name>/http or /dnsX/<name>/tcp/<port>/tls/http")
	}
	return "https://" + net.JoinHostPort(name, port), nil
}

// isHTTPAddr reports whether a is a /tls/.../http address whose name (SNI
// or DNS) is a concrete name under the forge's domain.
func (f *Forge) isHTTPAddr(a ma.Multiaddr) bool {
	return len(a) > 0 && a[len(a)-1].Code() == ma.P_HTTP && f.isForgeTLSAddr(a)
}
