package autotls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2phttp "github.com/libp2p/go-libp2p/p2p/http"
	httpauth "github.com/libp2p/go-libp2p/p2p/http/auth"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/goleak"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// httpAddrs returns the host's announced /http forge addresses.
func httpAddrs(h host.Host, forge string) []ma.Multiaddr {
	var out []ma.Multiaddr
	for _, a := range browserAddrs(h, forge) {
		if isHTTPAddr(a) {
			out = append(out, a)
		}
	}
	return out
}

// waitHTTPAddr waits until the host announces an /http forge address
// starting with prefix, and returns it with the /ws address on the same
// port.
func waitHTTPAddr(t testing.TB, h host.Host, forge, prefix string) (httpAddr, wsAddr ma.Multiaddr) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for _, a := range httpAddrs(h, forge) {
			if !strings.HasPrefix(a.String(), prefix) {
				continue
			}
			w := strings.TrimSuffix(a.String(), "/http") + "/ws"
			for _, b := range browserAddrs(h, forge) {
				if b.String() == w {
					return a, b
				}
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no %s…/http address with its /ws twin announced; have %v", prefix, h.Addrs())
	return nil, nil
}

// httpTarget is where an HTTP client goes for an announced /http address:
// the TLS server name, the URL (https://<name>:<port>), and the TCP
// address to dial (as curl --resolve <name>:<port>:<ip> does).
type httpTarget struct {
	name, url, dial string
}

// httpTargetOf reads an /http address, long or short; a short one's name is
// resolved through the forge's DNS.
func httpTargetOf(t testing.TB, f *testforge.Forge, a ma.Multiaddr) httpTarget {
	t.Helper()
	port, err := a.ValueForProtocol(ma.P_TCP)
	if err != nil {
		t.Fatalf("no port in %s", a)
	}
	if name, err := a.ValueForProtocol(ma.P_SNI); err == nil {
		ip, err := a.ValueForProtocol(ma.P_IP4)
		if err != nil {
			t.Fatalf("no ip4 in %s", a)
		}
		return httpTarget{name, "https://" + net.JoinHostPort(name, port), net.JoinHostPort(ip, port)}
	}
	name, err := a.ValueForProtocol(ma.P_DNS4)
	if err != nil {
		t.Fatalf("neither /sni nor /dns4 in %s", a)
	}
	ips, err := f.Resolver().LookupHost(t.Context(), name)
	if err != nil || len(ips) == 0 {
		t.Fatalf("resolving %s through the forge: %v", name, err)
	}
	return httpTarget{name, "https://" + net.JoinHostPort(name, port), net.JoinHostPort(ips[0], port)}
}

// httpsTransport trusts only roots and dials every request to dial,
// speaking the given ALPN protocols ("h2", "http/1.1").
func httpsTransport(roots *x509.CertPool, dial string, protos ...string) *http.Transport {
	p := new(http.Protocols)
	for _, s := range protos {
		switch s {
		case "h2":
			p.SetHTTP2(true)
		case "http/1.1":
			p.SetHTTP1(true)
		}
	}
	return &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		Protocols:       p,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, dial)
		},
	}
}

// httpGet sends GET url through tr and returns the response with its
// body read.
func httpGet(t testing.TB, tr http.RoundTripper, url string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading %s: %v", url, err)
	}
	return resp, string(b)
}

// helloHandler answers /hello with the TLS server name and protocol it was
// reached by.
func helloHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		sni := ""
		if r.TLS != nil {
			sni = r.TLS.ServerName
		}
		fmt.Fprintf(w, "hello %s over %s", sni, r.Proto)
	})
	return mux
}

// TestHTTPSOnWSSPort: with WithHTTPHandler the host announces the /http
// form of each browser address while its certificate is valid; a Go client
// trusting only Pebble's root gets 200 from the handler over HTTP/2 and
// over HTTP/1.1 at that address, and a libp2p peer dials the /ws address on
// the same port and pings across in the same test. The server's header
// limit holds, and without the option there is neither an /http address
// nor a handler.
func TestHTTPSOnWSSPort(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name   string
		short  bool
		prefix string
	}{
		{"long form", false, "/ip4/127.0.0.1/tcp/"},
		{"short form", true, "/dns4/127-0-0-1."},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := []Opt{WithStorage(storage.Memory()), WithHTTPHandler(helloHandler())}
			if tc.short {
				opts = append(opts, WithShortAddrs())
			}
			h := newHost(t, f, nil, opts...)
			httpAddr, wsAddr := waitHTTPAddr(t, h, f.Domain, tc.prefix)
			name := "127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + f.Domain
			port, _ := wsAddr.ValueForProtocol(ma.P_TCP)
			want := fmt.Sprintf("/ip4/127.0.0.1/tcp/%s/tls/sni/%s/http", port, name)
			if tc.short {
				want = fmt.Sprintf("/dns4/%s/tcp/%s/tls/http", name, port)
			}
			if httpAddr.String() != want {
				t.Fatalf("announced %s, want %s", httpAddr, want)
			}
			if n := len(httpAddrs(h, f.Domain)); n != 1 {
				t.Errorf("%d /http addresses announced, want 1: %v", n, h.Addrs())
			}

			target := httpTargetOf(t, f, httpAddr)
			for _, proto := range []string{"h2", "http/1.1"} {
				tr := httpsTransport(f.IssuerRoots, target.dial, proto)
				resp, body := httpGet(t, tr, target.url+"/hello")
				tr.CloseIdleConnections()
				wantProto := map[string]string{"h2": "HTTP/2.0", "http/1.1": "HTTP/1.1"}[proto]
				if resp.StatusCode != http.StatusOK || resp.Proto != wantProto || body != "hello "+name+" over "+wantProto {
					t.Fatalf("%s: %s %s %q; want 200 over %s from the handler", proto, resp.Proto, resp.Status, body, wantProto)
				}
				if resp.TLS == nil || len(resp.TLS.VerifiedChains) == 0 {
					t.Fatalf("%s: the response did not come over a verified TLS connection", proto)
				}
			}

			// An untrusted root fails the handshake: the certificate is
			// Pebble's, not some fallback.
			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: x509.NewCertPool()}, DialContext: httpsTransport(nil, target.dial).DialContext}
			if resp, err := tr.RoundTrip(getRequest(t, target.url+"/hello")); err == nil {
				resp.Body.Close()
				t.Fatal("a client trusting no root got a response")
			}

			// The WebSocket transport on the same port still carries libp2p.
			dialAndPing(t, f, h.ID(), wsAddr)

			// Header blocks beyond the default limit are refused.
			tr = httpsTransport(f.IssuerRoots, target.dial, "http/1.1")
			defer tr.CloseIdleConnections()
			req := getRequest(t, target.url+"/hello")
			req.Header.Set("X-Big", strings.Repeat("a", 2*httpMaxHeaderBytes))
			resp, err := tr.RoundTrip(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
				t.Errorf("a %d KiB header got %s, want 431", 2*httpMaxHeaderBytes>>10, resp.Status)
			}
		})
	}

	t.Run("without the option", func(t *testing.T) {
		h := newHost(t, f, nil, WithStorage(storage.Memory()))
		wsAddr := waitBrowserAddr(t, h, f.Domain, "/ip4/127.0.0.1/")
		if a := httpAddrs(h, f.Domain); len(a) != 0 {
			t.Fatalf("/http addresses announced without a handler: %v", a)
		}
		port, _ := wsAddr.ValueForProtocol(ma.P_TCP)
		name := "127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + f.Domain
		tr := httpsTransport(f.IssuerRoots, "127.0.0.1:"+port, "h2")
		defer tr.CloseIdleConnections()
		if resp, _ := httpGet(t, tr, "https://"+name+":"+port+"/hello"); resp.StatusCode != http.StatusNotFound {
			t.Fatalf("without a handler got %s, want 404", resp.Status)
		}
	})
}

func getRequest(t testing.TB, url string) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	return req
}

// TestHTTPServerConfig: the function given with WithHTTPServerConfig sees
// the defaults and its changes apply.
func TestHTTPServerConfig(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	var seen http.Server
	h := newHost(t, f, nil, WithStorage(storage.Memory()), WithHTTPHandler(helloHandler()),
		WithHTTPServerConfig(func(s *http.Server) {
			seen = http.Server{ReadHeaderTimeout: s.ReadHeaderTimeout, IdleTimeout: s.IdleTimeout, MaxHeaderBytes: s.MaxHeaderBytes}
			s.MaxHeaderBytes = 1 << 10
		}))
	httpAddr, _ := waitHTTPAddr(t, h, f.Domain, "/ip4/")
	if seen.ReadHeaderTimeout != httpReadHeaderTimeout || seen.IdleTimeout != httpIdleTimeout || seen.MaxHeaderBytes != httpMaxHeaderBytes {
		t.Errorf("the config function saw ReadHeaderTimeout %v, IdleTimeout %v, MaxHeaderBytes %d; want the defaults", seen.ReadHeaderTimeout, seen.IdleTimeout, seen.MaxHeaderBytes)
	}
	target := httpTargetOf(t, f, httpAddr)
	tr := httpsTransport(f.IssuerRoots, target.dial, "http/1.1")
	defer tr.CloseIdleConnections()
	req := getRequest(t, target.url+"/hello")
	req.Header.Set("X-Big", strings.Repeat("a", 8<<10))
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("an 8 KiB header with MaxHeaderBytes 1 KiB got %s, want 431", resp.Status)
	}
	if _, err := newConfig([]Opt{WithHTTPServerConfig(func(*http.Server) {}), WithStorage(storage.Memory())}); err != errHTTPConfigAlone {
		t.Errorf("WithHTTPServerConfig without a handler gave %v, want %v", err, errHTTPConfigAlone)
	}
	for _, o := range []Opt{WithHTTPHandler(nil), WithHTTPServerConfig(nil)} {
		if _, err := newConfig([]Opt{o, WithStorage(storage.Memory())}); err == nil || !strings.Contains(err.Error(), "nil): pass") {
			t.Errorf("a nil argument gave %v, want an error saying what to pass", err)
		}
	}
}

// TestHTTPLibp2pHTTP: go-libp2p's HTTP host (p2p/http) mounted with
// WithHTTPHandler. A p2p/http client given only the announced /http
// multiaddr reads /.well-known/libp2p/protocols over our certificate and
// reaches a protocol handler by its name; the same handler answers over
// libp2p streams; PeerID auth (p2p/http/auth) runs on the same listener,
// so the client learns and checks the server's PeerID and the server
// learns the client's.
func TestHTTPLibp2pHTTP(t *testing.T) {
	f := startForge(t, testforge.Config{})
	ignore := goleak.IgnoreCurrent()
	const proto = "/autotls-test/echo/1.0.0"

	serverKey := genKey(t, crypto.Ed25519) // Ed25519
	mux := http.NewServeMux()
	srv := &libp2phttp.Host{ServeMux: mux}
	h := newHost(t, f, []libp2p.Option{libp2p.Identity(serverKey)}, WithStorage(storage.Memory()), WithHTTPHandler(mux))
	srv.StreamHost = h
	srv.SetHTTPHandler(proto, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		via := "stream"
		if r.TLS != nil {
			via = "https " + r.Proto
		}
		fmt.Fprintf(w, "echo %s via %s", r.URL.Path, via)
	}))
	// PeerID auth: go-libp2p's ServerPeerIDAuth compares the Host header
	// with the TLS server name, and a Host header carries the port
	// (<name>:4001). The wrapper checks the name itself, then lets the
	// handshake sign the Host header as the client sent it.
	auth := &httpauth.ServerPeerIDAuth{
		PrivKey: serverKey, TokenTTL: time.Hour, NoTLS: true,
		ValidHostnameFn: func(string) bool { return true },
		Next: func(client peer.ID, w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello %s", client)
		},
	}
	mux.HandleFunc("/auth", func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || hostWithoutPort(r.Host) != r.TLS.ServerName {
			http.Error(w, "the Host header does not name the TLS server name", http.StatusBadRequest)
			return
		}
		auth.ServeHTTP(w, r)
	})
	served := make(chan error, 1)
	go func() { served <- srv.Serve() }()
	var once sync.Once
	stop := func() { once.Do(func() { srv.Close(); <-served }) }
	defer stop()

	httpAddr, wsAddr := waitHTTPAddr(t, h, f.Domain, "/ip4/")
	target := httpTargetOf(t, f, httpAddr)

	t.Run("p2p/http client over HTTPS", func(t *testing.T) {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: f.IssuerRoots}, ForceAttemptHTTP2: true}
		defer tr.CloseIdleConnections()
		client := &libp2phttp.Host{DefaultClientRoundTripper: tr}
		c, err := client.NamespacedClient(proto, peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{httpAddr}})
		if err != nil {
			t.Fatal(err)
		}
		resp, err := c.Get("/x")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(b) != "echo /x via https HTTP/2.0" {
			t.Fatalf("protocol handler over %s: %s %q", httpAddr, resp.Status, b)
		}
		// The multiaddr URI form, with the protocol's path from the
		// well-known resource.
		meta, ok := client.GetPeerMetadata(h.ID())
		if !ok || meta[proto].Path == "" {
			t.Fatalf("no metadata for %s after the request: %v", proto, meta)
		}
		u := "multiaddr:" + httpAddr.String() + "/http-path/" + url.QueryEscape(meta[proto].Path+"y")
		resp, err2 := (&http.Client{Transport: client}).Get(u)
		if err2 != nil {
			t.Fatalf("GET %s: %v", u, err2)
		}
		b, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "echo /y via https HTTP/2.0" {
			t.Fatalf("GET %s: %s %q", u, resp.Status, b)
		}
	})

	t.Run("p2p/http client over libp2p streams", func(t *testing.T) {
		d, err := libp2p.New(f.DialerOptions()...)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		client := &libp2phttp.Host{StreamHost: d}
		c, err := client.NamespacedClient(proto, peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{wsAddr}})
		if err != nil {
			t.Fatal(err)
		}
		resp, err := c.Get("/z")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "echo /z via stream" {
			t.Fatalf("protocol handler over a libp2p stream: %s %q", resp.Status, b)
		}
		if conns := d.Network().ConnsToPeer(h.ID()); len(conns) == 0 || !strings.Contains(conns[0].RemoteMultiaddr().String(), "/ws") {
			t.Fatalf("the stream did not go over the WSS listener: %v", conns)
		}
	})

	t.Run("PeerID auth", func(t *testing.T) {
		clientKey := genKey(t, crypto.Ed25519)
		clientID, err := peer.IDFromPrivateKey(clientKey)
		if err != nil {
			t.Fatal(err)
		}
		tr := httpsTransport(f.IssuerRoots, target.dial, "h2")
		defer tr.CloseIdleConnections()
		ca := &httpauth.ClientPeerIDAuth{PrivKey: clientKey, TokenTTL: time.Hour}
		for i := range 2 { // the second request uses the bearer token
			serverID, resp, err := ca.AuthenticatedDo(&http.Client{Transport: tr}, getRequest(t, target.url+"/auth"))
			if err != nil {
				t.Fatalf("request %d: %v", i+1, err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if serverID != h.ID() || string(b) != "hello "+clientID.String() {
				t.Fatalf("request %d: server %s said %q; want %s to greet %s", i+1, serverID, b, h.ID(), clientID)
			}
		}
		// p2p/http's own client, given a multiaddr ending in /p2p/<id>,
		// runs the same handshake and fails unless the server proves that
		// PeerID. (The short form: for the long one it sends the IP as the
		// Host header.)
		port, _ := httpAddr.ValueForProtocol(ma.P_TCP)
		short := fmt.Sprintf("/dns4/%s/tcp/%s/tls/http/p2p/%s", target.name, port, h.ID())
		resolving := &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: f.IssuerRoots},
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				d := &net.Dialer{Timeout: 5 * time.Second, Resolver: f.Resolver()}
				return d.DialContext(ctx, network, addr)
			},
		}
		defer resolving.CloseIdleConnections()
		client := &libp2phttp.Host{DefaultClientRoundTripper: resolving, ClientPeerIDAuth: &httpauth.ClientPeerIDAuth{PrivKey: clientKey, TokenTTL: time.Hour}}
		for _, tc := range []struct {
			id     string
			wantOK bool
		}{{h.ID().String(), true}, {clientID.String(), false}} {
			u := "multiaddr:" + strings.Replace(short, h.ID().String(), tc.id, 1) + "/http-path/auth"
			resp, err := (&http.Client{Transport: client}).Get(u)
			if !tc.wantOK {
				if err == nil {
					resp.Body.Close()
					t.Errorf("GET %s succeeded; the server is not that peer", u)
				} else if !strings.Contains(err.Error(), "does not match expected server ID") {
					t.Errorf("GET %s: %v; want a PeerID mismatch", u, err)
				}
				continue
			}
			if err != nil {
				t.Fatalf("GET %s: %v", u, err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if libp2phttp.ServerPeerID(resp) != h.ID() || string(b) != "hello "+clientID.String() {
				t.Fatalf("GET %s: server %s said %q", u, libp2phttp.ServerPeerID(resp), b)
			}
		}

		// A Host header naming another name than the TLS server name is
		// refused before any signature.
		req := getRequest(t, target.url+"/auth")
		req.Host = "other." + f.Domain
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("a mismatched Host header got %s, want 400", resp.Status)
		}
	})

	stop()
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	goleak.VerifyNone(t, append(goleakIgnores(), ignore,
		// net/http lingers up to 500 ms after a "Connection: close"
		// response (p2p/http sets it on every stream) before closing the
		// connection; the goroutine ends on its own.
		goleak.IgnoreAnyFunction("net/http.(*conn).closeWriteAndWait"))...)
}

// hostWithoutPort strips a port from a Host header.
func hostWithoutPort(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return hostport
}

// TestHTTPAddrsWithdrawnAtExpiry: when renewal keeps failing until the
// certificate expires, the /http addresses go with the /ws ones and the
// port no longer serves the handler; until then both are there.
func TestHTTPAddrsWithdrawnAtExpiry(t *testing.T) {
	f := startForge(t, testforge.Config{CertValidity: 24 * time.Hour})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute))
	r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots), WithHTTPHandler(helloHandler()))
	r.closers = append(r.closers, ca.Close)
	served := r.waitLoaded(t)
	httpAddr, _ := waitHTTPAddr(t, r.h, f.Domain, "/ip4/")
	target := httpTargetOf(t, f, httpAddr)
	clk.WaitParked(t, 30*time.Second)
	forgetValidAuthz(t, r, ca)
	expired, err := r.h.EventBus().Subscribe(new(EvtCertificateExpired))
	if err != nil {
		t.Fatal(err)
	}
	defer expired.Close()
	f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
		http.Error(w, "maintenance", http.StatusServiceUnavailable)
		return true
	})
	defer f.SetBrokerFault(nil)

	notAfter := served.leaf.NotAfter
	clk.SetHorizon(notAfter.Add(-time.Minute))
	clk.WaitParked(t, 30*time.Second)
	if a := httpAddrs(r.h, f.Domain); len(a) != 1 {
		t.Fatalf("a minute before expiry the /http addresses are %v, want %s", a, httpAddr)
	}
	tr := httpsTransport(f.IssuerRoots, target.dial, "h2")
	// The fake clock is hours ahead; the client checks the certificate
	// against it, as the host does.
	tr.TLSClientConfig.Time = clk.Now
	if resp, _ := httpGet(t, tr, target.url+"/hello"); resp.StatusCode != http.StatusOK {
		t.Fatalf("a minute before expiry: %s", resp.Status)
	}
	tr.CloseIdleConnections()

	clk.SetHorizon(notAfter.Add(time.Hour))
	select {
	case <-expired.Out():
	case <-time.After(30 * time.Second):
		t.Fatal("no EvtCertificateExpired")
	}
	if a := httpAddrs(r.h, f.Domain); len(a) != 0 {
		t.Errorf("/http addresses still announced after expiry: %v", a)
	}
	if a := browserAddrs(r.h, f.Domain); len(a) != 0 {
		t.Errorf("browser addresses still announced after expiry: %v", a)
	}
	if resp, err := tr.RoundTrip(getRequest(t, target.url+"/hello")); err == nil {
		resp.Body.Close()
		t.Errorf("the handler still answers after expiry: %s", resp.Status)
	}
	tr.CloseIdleConnections()
	pingOverTCP(t, f, r.h)
	r.closeAndCheck(t, leaks)
}

// TestHTTPRenewal: a renewal with the handler in place sends the broker no
// /http address (it dials back over libp2p), and the handler and its
// address stay up across it.
func TestHTTPRenewal(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	var m *manager
	h := newHost(t, f, nil, WithStorage(storage.Memory()), WithHTTPHandler(helloHandler()), withManager(func(x *manager) { m = x }))
	first := waitCert(t, h, 30*time.Second)
	httpAddr, _ := waitHTTPAddr(t, h, f.Domain, "/ip4/")
	target := httpTargetOf(t, f, httpAddr)
	tr := httpsTransport(f.IssuerRoots, target.dial, "h2")
	defer tr.CloseIdleConnections()
	before, _ := httpGet(t, tr, target.url+"/hello")
	tr.CloseIdleConnections()
	sent := make(chan []string, 1)
	f.SetDialBackFault(func(_ peer.ID, addrs []string) error {
		select {
		case sent <- addrs:
		default:
		}
		return nil
	})
	sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	<-sub.Out() // the stateful event of the first certificate
	m.kick <- struct{}{}
	select {
	case e := <-sub.Out():
		if ev := e.(EvtCertificateLoaded); ev.Source != Renewed || !ev.NotAfter.After(first.NotAfter.Add(-time.Second)) {
			t.Fatalf("event %+v, want a renewal", ev)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no renewal")
	}
	var addrs []string
	select {
	case addrs = <-sent:
	default:
		t.Fatal("the renewal made no dial-back")
	}
	for _, a := range addrs {
		if strings.HasSuffix(a, "/http") {
			t.Errorf("the broker was sent %s among %v", a, addrs)
		}
	}
	if a := httpAddrs(h, f.Domain); len(a) != 1 || !a[0].Equal(httpAddr) {
		t.Errorf("after the renewal the /http addresses are %v, want %s", a, httpAddr)
	}
	old := before.TLS.PeerCertificates[0]
	if resp, _ := httpGet(t, tr, target.url+"/hello"); resp.StatusCode != http.StatusOK || resp.TLS.PeerCertificates[0].Equal(old) {
		t.Errorf("after the renewal: %s, served serial %v (the first was %v)", resp.Status, resp.TLS.PeerCertificates[0].SerialNumber, old.SerialNumber)
	}
}
