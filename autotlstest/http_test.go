package autotlstest_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/autotlstest"
)

// helloHandler answers /hello with the protocol and TLS server name it saw.
func helloHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
		name := "no TLS"
		if r.TLS != nil {
			name = r.TLS.ServerName
		}
		fmt.Fprintf(w, "hello over %s to %s", r.Proto, name)
	})
	return mux
}

// get fetches url with f's HTTP client, bounded by the test, and returns
// the response with its body read.
func get(t *testing.T, f *autotlstest.Forge, url string) (*http.Response, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := f.HTTPClient().Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

// TestHTTPS: a host serving HTTP announces its /http address (both forms),
// and the kit's client fetches from it by the certificate's name, over
// HTTP/2, trusting only the forge's CA.
func TestHTTPS(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		opts   []autotls.Opt
		prefix string
	}{
		{"long", nil, "/ip4/127.0.0.1/tcp/"},
		{"short", []autotls.Opt{autotls.WithShortAddrs()}, "/dns4/127-0-0-1."},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := autotlstest.New(t)
			h := newHost(t, f, nil, append(tc.opts, autotls.WithHTTPHandler(helloHandler()))...)
			addr := f.WaitHTTPAddr(t, h)
			if !strings.HasPrefix(addr.String(), tc.prefix) || !strings.HasSuffix(addr.String(), "/http") {
				t.Fatalf("/http address %s, want %s…/http", addr, tc.prefix)
			}
			name := certName(t, addr)
			port, _ := addr.ValueForProtocol(ma.P_TCP)
			u := autotlstest.HTTPURL(t, addr)
			if want := "https://" + name + ":" + port; u != want {
				t.Fatalf("HTTPURL(%s) = %s, want %s", addr, u, want)
			}

			resp, body, err := get(t, f, u+"/hello")
			if err != nil {
				t.Fatalf("GET %s/hello: %v", u, err)
			}
			if resp.StatusCode != http.StatusOK || resp.Proto != "HTTP/2.0" || body != "hello over HTTP/2.0 to "+name {
				t.Fatalf("GET %s/hello: %s %s %q; want 200 over HTTP/2.0 saying hello to %s", u, resp.Proto, resp.Status, body, name)
			}
			if leaf := resp.TLS.PeerCertificates[0]; leaf.VerifyHostname(name) != nil || len(resp.TLS.VerifiedChains) == 0 {
				t.Fatalf("served certificate for %v, want one for %s verified against the forge's root", leaf.DNSNames, name)
			}
			// The browser address is served on the same port.
			if ws := f.WaitBrowserAddr(t, h); strings.TrimSuffix(ws.String(), "/ws") != strings.TrimSuffix(addr.String(), "/http") {
				t.Errorf("browser address %s is not the /ws twin of %s", ws, addr)
			}
		})
	}
}

// certName returns the certificate name in an /http address: the SNI of
// the long form, the DNS name of the short one.
func certName(t *testing.T, a ma.Multiaddr) string {
	t.Helper()
	for _, p := range []int{ma.P_SNI, ma.P_DNS4, ma.P_DNS6, ma.P_DNS} {
		if v, err := a.ValueForProtocol(p); err == nil {
			return v
		}
	}
	t.Fatalf("no name in %s", a)
	return ""
}

// TestHTTPClientConfined: the kit's client resolves only the forge's
// names, through the forge's DNS; dials only loopback, whatever a name
// resolves to; and trusts only the forge's CA.
func TestHTTPClientConfined(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	h := newHost(t, f, nil, autotls.WithHTTPHandler(helloHandler()))
	addr := f.WaitHTTPAddr(t, h)
	name := certName(t, addr)
	port, _ := addr.ValueForProtocol(ma.P_TCP)

	// A server on loopback with a certificate from another CA.
	other := httptest.NewUnstartedServer(helloHandler())
	other.Config.ErrorLog = log.New(io.Discard, "", 0) // the handshake it fails is expected
	other.StartTLS()
	defer other.Close()

	for _, tc := range []struct {
		name, url, want string
		dnsQueries      bool // the forge's DNS is asked
	}{
		{"name outside the forge", "https://example.com/hello", "resolves names under " + f.Domain() + " only, not example.com", false},
		{"forge name of a non-loopback IP", "https://" + strings.Replace(name, "127-0-0-1", "192-0-2-1", 1) + ":" + port + "/hello", "dials loopback only, not 192.0.2.1:" + port, true},
		{"non-loopback IP", "https://192.0.2.1:" + port + "/hello", "dials loopback only, not 192.0.2.1:" + port, false},
		{"certificate from another CA", other.URL + "/hello", "certificate signed by unknown authority", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.Stats().DNS
			resp, body, err := get(t, f, tc.url)
			if err == nil {
				t.Fatalf("GET %s: %s %q; want an error", tc.url, resp.Status, body)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("GET %s: %v; want %q", tc.url, err, tc.want)
			}
			if asked := f.Stats().DNS > before; asked != tc.dnsQueries {
				t.Errorf("GET %s: the forge's DNS asked: %v, want %v", tc.url, asked, tc.dnsQueries)
			}
		})
	}
	// And the host itself is still fetched by name.
	if _, body, err := get(t, f, autotlstest.HTTPURL(t, addr)+"/hello"); err != nil || !strings.HasPrefix(body, "hello over HTTP/2.0") {
		t.Fatalf("GET the host: %q, %v", body, err)
	}
}

// TestHTTPURL: the URL of each form of /http address, and a test failed
// for anything else.
func TestHTTPURL(t *testing.T) {
	t.Parallel()
	const name = "127-0-0-1.k51qzi5uqu5dgutdk6i1ynyzgkqngpha5xpgia3a5qqp4jsh0u4csozksxel3r.libp2p.direct"
	for _, tc := range []struct {
		addr, want string // want "" for a failure
	}{
		{"/ip4/127.0.0.1/tcp/4001/tls/sni/" + name + "/http", "https://" + name + ":4001"},
		{"/dns4/" + name + "/tcp/4001/tls/http", "https://" + name + ":4001"},
		{"/ip6/::1/tcp/4001/tls/sni/" + name + "/http/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA", "https://" + name + ":4001"},
		{"/ip6/::1/tcp/4001/tls/http", "https://[::1]:4001"},
		{"/ip4/127.0.0.1/tcp/4001/tls/sni/" + name + "/ws", ""},
		{"/ip4/127.0.0.1/tcp/4001/http", ""},
		{"/ip4/127.0.0.1/udp/4001/quic-v1", ""},
		{"/ip4/127.0.0.1/tcp/4001/tls/http/http-path/foo", ""},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			a, err := ma.NewMultiaddr(tc.addr)
			if err != nil {
				t.Fatal(err)
			}
			tb := &fatalTB{TB: t}
			var got string
			done := make(chan struct{})
			go func() {
				defer close(done)
				got = autotlstest.HTTPURL(tb, a)
			}()
			<-done
			switch {
			case tc.want != "" && (got != tc.want || tb.msg != ""):
				t.Errorf("HTTPURL = %q (failure %q), want %q", got, tb.msg, tc.want)
			case tc.want == "" && tb.msg == "":
				t.Errorf("HTTPURL = %q, want the test failed", got)
			case tc.want == "":
				t.Logf("the test reads: %s", tb.msg)
			}
		})
	}
}

// TestWaitHTTPAddrWithoutHandler: a host built without WithHTTPHandler has
// a browser address but no /http one; the failure says so and gives the
// host's status.
func TestWaitHTTPAddrWithoutHandler(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t, autotlstest.WithWaitTimeout(time.Second))
	h := newHost(t, f, nil)
	waitCertificate(t, h)
	tb := &fatalTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.WaitHTTPAddr(tb, h)
	}()
	<-done
	for _, want := range []string{
		"no /http address within 1s, though it announces the browser address /ip4/127.0.0.1/",
		"autotls.WithHTTPHandler",
		"autotls status: valid: certificate valid until ",
	} {
		if !strings.Contains(tb.msg, want) {
			t.Errorf("WaitHTTPAddr failed with %q; want %q in it", tb.msg, want)
		}
	}
	t.Logf("the test reads: %s", tb.msg)
}

// waitCertificate waits until h has loaded a certificate.
func waitCertificate(t *testing.T, h host.Host) {
	t.Helper()
	sub, err := h.EventBus().Subscribe(new(autotls.EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	select {
	case <-sub.Out():
	case <-time.After(30 * time.Second):
		t.Fatal("no certificate within 30s")
	}
}

// TestHTTPClientClosedWithTheTest: the idle connections of the kit's
// client are closed when the test ends, even to a host the test closes
// later (one built without HostOptions, which the kit does not close).
func TestHTTPClientClosedWithTheTest(t *testing.T) {
	t.Parallel()
	closed := make(chan struct{}, 1)
	onClose := func(s *http.Server) {
		s.ConnState = func(_ net.Conn, st http.ConnState) {
			if st == http.StateClosed {
				select {
				case closed <- struct{}{}:
				default:
				}
			}
		}
	}
	var h host.Host
	t.Run("test", func(t *testing.T) {
		f := autotlstest.New(t)
		var err error
		h, err = libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"),
			autotls.Option(append(f.Options(), autotls.WithHTTPHandler(helloHandler()), autotls.WithHTTPServerConfig(onClose))...))
		if err != nil {
			t.Fatal(err)
		}
		u := autotlstest.HTTPURL(t, f.WaitHTTPAddr(t, h)) + "/hello"
		if resp, body, err := get(t, f, u); err != nil || resp.Proto != "HTTP/2.0" {
			t.Fatalf("GET %s: %q, %v", u, body, err)
		}
		select {
		case <-closed:
			t.Fatal("the connection closed before the test ended")
		default: // idle in the client's pool
		}
	})
	defer h.Close()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the host still had the client's connection 10s after the test ended")
	}
}
