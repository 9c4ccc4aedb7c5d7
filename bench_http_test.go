package autotls

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ws "github.com/libp2p/go-libp2p/p2p/transport/websocket"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// BenchmarkHTTPS compares the HTTPS server behind WithHTTPHandler (the WSS
// listener: the shared TCP port's demultiplexer, the host's resource
// manager, the WebSocket transport's dispatch, GetCertificate per
// handshake) with a plain net/http TLS server holding the same certificate
// statically, with the same limits, both serving the same small handler on
// loopback. The two sides alternate op by op in the same run, and the
// rates come from the median op times, so that load from other processes
// hits both alike. ratio is ours over static (1 = as fast).
//
//   - requests: one op is a burst of 64 GETs from 4 goroutines over one
//     warm HTTP/2 connection, verified against Pebble's root.
//   - connections: one op is a new TCP and TLS 1.3 connection (full
//     handshake, no resumption) carrying one HTTP/1.1 GET, then closed.
//     The client skips certificate verification, as in
//     BenchmarkHandshake, so that the figure is the server's.
//
// host=default is a host with libp2p's defaults; host=null-rcmgr replaces
// its resource manager with network.NullResourceManager, to show what the
// resource manager's accounting of each connection costs; host=go-libp2p
// serves from a second host built without autotls, go-libp2p's WebSocket
// transport given the same certificate in a static tls.Config, the same
// handler and limits (a baseline: what go-libp2p's listener costs by
// itself).
func BenchmarkHTTPS(b *testing.B) {
	quietLibp2p()
	f := startForge(b, testforge.Config{})
	for _, v := range []struct {
		name  string
		opts  []libp2p.Option
		plain bool
	}{
		{"default", nil, false},
		{"null-rcmgr", []libp2p.Option{libp2p.ResourceManager(&network.NullResourceManager{})}, false},
		{"go-libp2p", nil, true},
	} {
		b.Run("host="+v.name, func(b *testing.B) { benchHTTPS(b, f, v.opts, v.plain) })
	}
}

func benchHTTPS(b *testing.B, f *testforge.Forge, extra []libp2p.Option, plain bool) {
	handler := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok")
	})
	var m *manager
	all := append(f.HostOptions(), libp2p.Identity(benchKey(b)))
	all = append(all, extra...)
	all = append(all, Option(benchOpts(f, WithStorage(storage.Memory()), WithHTTPHandler(handler), withManager(func(x *manager) { m = x }))...))
	h, err := libp2p.New(all...)
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	httpAddr, _ := waitHTTPAddr(b, h, f.Domain, "/ip4/127.0.0.1/")
	target := httpTargetOf(b, f, httpAddr)
	if plain {
		target.dial = plainWSSHost(b, f, *m.cert.Load().tls, handler)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	static := &http.Server{
		Handler:           handler,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*m.cert.Load().tls}},
		ReadHeaderTimeout: httpReadHeaderTimeout,
		IdleTimeout:       httpIdleTimeout,
		MaxHeaderBytes:    httpMaxHeaderBytes,
	}
	var wg sync.WaitGroup
	wg.Go(func() { _ = static.ServeTLS(ln, "", "") })
	defer func() { static.Close(); wg.Wait() }()
	staticDial := ln.Addr().String()

	b.Run("requests", func(b *testing.B) {
		ours := httpsTransport(f.IssuerRoots, target.dial, "h2")
		stat := httpsTransport(f.IssuerRoots, staticDial, "h2")
		defer ours.CloseIdleConnections()
		defer stat.CloseIdleConnections()
		burst := func(tr *http.Transport) {
			var wg sync.WaitGroup
			for range 4 {
				wg.Go(func() {
					for range 16 {
						benchGet(b, tr, target.url+"/")
					}
				})
			}
			wg.Wait()
		}
		alternateRates(b, func() { burst(ours) }, func() { burst(stat) }, 64, "req/s")
	})

	b.Run("connections", func(b *testing.B) {
		conn := func(dial string) *http.Transport {
			tr := httpsTransport(nil, dial, "http/1.1")
			tr.TLSClientConfig.InsecureSkipVerify = true // measure the server, not the client's chain checks
			tr.TLSClientConfig.ServerName = target.name
			tr.DisableKeepAlives = true
			return tr
		}
		ours, stat := conn(target.dial), conn(staticDial)
		alternateRates(b, func() { benchGet(b, ours, target.url+"/") }, func() { benchGet(b, stat, target.url+"/") }, 1, "conn/s")
	})

	// Connections per second under load: 4 clients opening 4 new
	// connections each, as the requests are measured. The one-at-a-time
	// figure above is a latency: it also counts each goroutine hand-off
	// on the listener's way, which a loaded server overlaps.
	b.Run("connections-parallel", func(b *testing.B) {
		conn := func(dial string) *http.Transport {
			tr := httpsTransport(nil, dial, "http/1.1")
			tr.TLSClientConfig.InsecureSkipVerify = true
			tr.TLSClientConfig.ServerName = target.name
			tr.DisableKeepAlives = true
			return tr
		}
		ours, stat := conn(target.dial), conn(staticDial)
		burst := func(tr *http.Transport) {
			var wg sync.WaitGroup
			for range 4 {
				wg.Go(func() {
					for range 4 {
						benchGet(b, tr, target.url+"/")
					}
				})
			}
			wg.Wait()
		}
		alternateRates(b, func() { burst(ours) }, func() { burst(stat) }, 16, "conn/s")
	})
}

// plainWSSHost starts a host without autotls serving handler with cert
// from go-libp2p's WebSocket transport, on a WSS listener sharing the TCP
// transport's listener as autotls's do, and returns the listener's
// address.
func plainWSSHost(b *testing.B, f *testforge.Forge, cert tls.Certificate, handler http.Handler) string {
	b.Helper()
	h, err := libp2p.New(append(f.HostOptions(),
		libp2p.ShareTCPListener(),
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0/tls/ws"),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Transport(ws.New,
			ws.WithTLSConfig(&tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}),
			ws.WithHTTPHandler(handler),
			ws.WithHTTPServerConfig(func(s *http.Server) {
				s.ReadHeaderTimeout = httpReadHeaderTimeout
				s.IdleTimeout = httpIdleTimeout
				s.MaxHeaderBytes = httpMaxHeaderBytes
			})),
	)...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = h.Close() })
	for _, a := range h.Network().ListenAddresses() {
		if _, err := a.ValueForProtocol(ma.P_WS); err == nil {
			return tcpHostPort(b, a)
		}
	}
	b.Fatalf("no WSS listener among %v", h.Network().ListenAddresses())
	return ""
}

// alternateRates runs ours and static b.N times each, one after the other and
// in alternating order, and reports each side's rate (n events per op,
// from the median op time) and their ratio.
func alternateRates(b *testing.B, ours, static func(), n float64, unit string) {
	ours()
	static()
	tOurs := make([]float64, 0, b.N)
	tStatic := make([]float64, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		first, second := ours, static
		if i%2 == 1 {
			first, second = static, ours
		}
		t0 := time.Now()
		first()
		t1 := time.Now()
		second()
		t2 := time.Now()
		a, c := t1.Sub(t0).Seconds(), t2.Sub(t1).Seconds()
		if i%2 == 1 {
			a, c = c, a
		}
		tOurs = append(tOurs, a)
		tStatic = append(tStatic, c)
	}
	b.StopTimer()
	b.ReportMetric(n/median(tOurs), "ours-"+unit)
	b.ReportMetric(n/median(tStatic), "static-"+unit)
	b.ReportMetric(median(tStatic)/median(tOurs), "ratio")
}

// benchGet sends one GET through tr and reads the answer whole.
func benchGet(b *testing.B, tr http.RoundTripper, url string) {
	req, err := http.NewRequestWithContext(context.Background(), http.MethodGet, url, nil)
	if err != nil {
		b.Error(err)
		return
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		b.Error(err)
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b.Errorf("GET %s: %s", url, resp.Status)
	}
}
