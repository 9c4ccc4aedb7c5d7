package autotls

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/pnet"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ws "github.com/libp2p/go-libp2p/p2p/transport/websocket"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestMistakesAtNew tries, as a new user would, the configurations that
// cannot work, in both option orders where the order could matter: each
// fails at libp2p.New with exactly one line that names autotls, the cause
// and what to do, and leaves no goroutine behind.
func TestMistakesAtNew(t *testing.T) {
	f := startForge(t, testforge.Config{})
	d := f.Domain
	auto := func(extra ...Opt) libp2p.Option {
		return Option(forgeOpts(f, append([]Opt{WithStorage(storage.Memory())}, extra...)...)...)
	}
	listen := func(addrs ...string) libp2p.Option { return libp2p.ListenAddrStrings(addrs...) }
	psk := libp2p.PrivateNetwork(pnet.PSK(make([]byte, 32)))
	ownTLS := &tls.Config{Certificates: []tls.Certificate{{}}}
	const tcpAddr = "/ip4/127.0.0.1/tcp/0"
	noTCP := "autotls: no TCP listen address to share with the WSS listener (the host listens on %s): add one, e.g. /ip4/0.0.0.0/tcp/4001, or a /ip4/0.0.0.0/tcp/443/tls/sni/*." + d + "/ws listen address"
	for _, tc := range []struct {
		name string
		opts []libp2p.Option // before autotls's, unless after
		auto libp2p.Option   // nil: auto()
		// after are options given after autotls's.
		after []libp2p.Option
		want  string // the exact error; a regexp if it starts with ^
	}{
		{name: "Option twice", opts: []libp2p.Option{listen(tcpAddr)}, after: []libp2p.Option{auto()},
			want: "autotls: Option is given twice; give it once, with all its options: autotls.Option(autotls.WithStorage(…), …)"},
		{name: "PrivateNetwork before Option", opts: []libp2p.Option{listen(tcpAddr), psk},
			want: "autotls: cannot be used with libp2p.PrivateNetwork: browsers cannot join a private network; remove one of the two"},
		{name: "PrivateNetwork after Option", opts: []libp2p.Option{listen(tcpAddr)}, after: []libp2p.Option{psk},
			want: "autotls: cannot be used with libp2p.PrivateNetwork: browsers cannot join a private network; remove one of the two"},
		{name: "QUIC only", opts: []libp2p.Option{listen("/ip4/127.0.0.1/udp/0/quic-v1")},
			want: fmt.Sprintf(noTCP, "/ip4/127.0.0.1/udp/0/quic-v1")},
		{name: "QUIC only, listen address given after Option", after: []libp2p.Option{listen("/ip4/127.0.0.1/udp/0/quic-v1")},
			want: fmt.Sprintf(noTCP, "/ip4/127.0.0.1/udp/0/quic-v1")},
		{name: "NoListenAddrs", opts: []libp2p.Option{libp2p.NoListenAddrs},
			want: "autotls: the host has no listen address, so no TCP port to share with the WSS listener: remove libp2p.NoListenAddrs, or listen on TCP, e.g. /ip4/0.0.0.0/tcp/4001"},
		{name: "websocket only", opts: []libp2p.Option{libp2p.Transport(ws.New), listen("/ip4/127.0.0.1/tcp/0/ws")},
			want: fmt.Sprintf(noTCP, "/ip4/127.0.0.1/tcp/0/ws")},
		{name: "websocket transport only, TCP listen address", opts: []libp2p.Option{libp2p.Transport(ws.New), libp2p.Transport(quic.NewTransport), listen(tcpAddr, "/ip4/127.0.0.1/udp/0/quic-v1")},
			want: `^autotls: the host has no TCP listener to share with the WSS listener \(it listens on /ip4/127\.0\.0\.1/udp/\d+/quic-v1\): give it a TCP transport and a TCP listen address it can open, e\.g\. /ip4/0\.0\.0\.0/tcp/4001$`},
		{name: "forge listen address of another domain", opts: []libp2p.Option{listen(tcpAddr, "/ip4/0.0.0.0/tcp/4001/tls/sni/*.libp2p.direct/ws")},
			auto: auto(WithForgeDomain("forge.example.net")),
			want: "autotls: listen address /ip4/0.0.0.0/tcp/4001/tls/sni/*.libp2p.direct/ws is for the forge domain libp2p.direct, but this host uses forge.example.net: write /ip4/0.0.0.0/tcp/4001/tls/sni/*.forge.example.net/ws"},
		{name: "endpoint with a path", auto: Option(WithRegistrationEndpoint("https://registration.libp2p.direct/v1/_acme-challenge"), WithStorage(storage.Memory())),
			want: `autotls: WithRegistrationEndpoint("https://registration.libp2p.direct/v1/_acme-challenge"): give the broker's base URL, https://registration.libp2p.direct; autotls adds /v1/_acme-challenge itself`},
		{name: "endpoint with the health path", auto: Option(WithRegistrationEndpoint("https://broker.example.net/forge/v1/health/"), WithForgeDomain("example.net"), WithStorage(storage.Memory())),
			want: `autotls: WithRegistrationEndpoint("https://broker.example.net/forge/v1/health/"): give the broker's base URL, https://broker.example.net/forge; autotls adds /v1/health itself`},
		{name: "own /tls/ws listen address", opts: []libp2p.Option{listen(tcpAddr, "/ip4/0.0.0.0/tcp/443/tls/ws")},
			want: "autotls: listen address /ip4/0.0.0.0/tcp/443/tls/ws serves Secure WebSockets for names that autotls has no certificate for: pass your certificate with autotls.WithTLSConfig, or listen on /ip4/0.0.0.0/tcp/443/tls/sni/*." + d + "/ws for the forge's"},
		{name: "own domain /tls/ws listen address", after: []libp2p.Option{listen(tcpAddr, "/dns4/example.com/tcp/443/tls/ws")},
			want: "autotls: listen address /dns4/example.com/tcp/443/tls/ws serves Secure WebSockets for names that autotls has no certificate for: pass your certificate with autotls.WithTLSConfig"},
		{name: "own /wss listen address", opts: []libp2p.Option{listen(tcpAddr, "/ip4/0.0.0.0/tcp/443/wss")},
			want: "autotls: listen address /ip4/0.0.0.0/tcp/443/wss serves Secure WebSockets for names that autotls has no certificate for: pass your certificate with autotls.WithTLSConfig, or listen on /ip4/0.0.0.0/tcp/443/tls/sni/*." + d + "/ws for the forge's"},
		{name: "websocket transport with a TLS config", opts: []libp2p.Option{listen(tcpAddr), libp2p.Transport(tcp.NewTCPTransport), libp2p.Transport(ws.New, ws.WithTLSConfig(ownTLS))},
			want: "autotls: a WebSocket transport given with websocket.WithTLSConfig is replaced by autotls's, and its certificate would never be served: pass that *tls.Config to autotls.WithTLSConfig instead"},
		{name: "websocket transport with a TLS config, after Option", opts: []libp2p.Option{listen(tcpAddr)}, after: []libp2p.Option{libp2p.Transport(tcp.NewTCPTransport), libp2p.Transport(ws.New, ws.WithTLSConfig(ownTLS))},
			want: "autotls: a WebSocket transport given with websocket.WithTLSConfig is replaced by autotls's, and its certificate would never be served: pass that *tls.Config to autotls.WithTLSConfig instead"},
		{name: "WithTLSConfig(nil)", auto: auto(WithTLSConfig(nil)),
			want: "autotls: WithTLSConfig(nil): pass the *tls.Config that serves your own names"},
		{name: "WithTLSConfig without a certificate", auto: auto(WithTLSConfig(&tls.Config{})),
			want: "autotls: WithTLSConfig: the configuration has no certificate; set Certificates, GetCertificate or GetConfigForClient"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			a := tc.auto
			if a == nil {
				a = auto()
			}
			opts := append([]libp2p.Option{libp2p.ConnectionGater(testforge.LoopbackGater())}, tc.opts...)
			opts = append(append(opts, a), tc.after...)
			h, err := libp2p.New(opts...)
			if err == nil {
				h.Close()
				t.Fatalf("libp2p.New succeeded; want %q", tc.want)
			}
			got := err.Error()
			if tc.want[0] == '^' {
				if !regexp.MustCompile(tc.want).MatchString(got) {
					t.Fatalf("error\n%s\ndoes not match\n%s", got, tc.want)
				}
			} else if got != tc.want {
				t.Fatalf("error\n%s\nwant\n%s", got, tc.want)
			}
			leaks()
		})
	}
}

// TestMistakeStorageNotWritable: a host whose storage cannot be written
// says so at start, before any gate (here the reachability gate, which a
// loopback host never passes, and an hour of registration delay), with one
// warning and an EvtIssuanceFailed; it keeps checking on the backoff of a
// failed attempt, the host's other transports work, and it asks nothing of
// the broker or the CA.
func TestMistakeStorageNotWritable(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	dir := filepath.Join(t.TempDir(), "store")
	st, err := storage.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	fix := breakDir(t, dir)
	defer fix()
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(30 * time.Minute))
	before := f.Stats()
	r := &faultRig{f: f, clk: clk, logs: &logCapture{}, fails: &failureLog{}}
	h, err := libp2p.New(append(f.HostOptions(), r.fails.option(t), Option(
		WithForgeDomain(f.Domain), WithRegistrationEndpoint(f.BrokerURL), WithCA(f.CAURL, f.CARoots),
		WithResolver(f.Resolver()), WithStorage(st), WithRegistrationDelay(time.Hour),
		WithLogger(r.logs.logger()), withClock(clk), withManager(func(m *manager) { r.m = m }),
	))...)
	if err != nil {
		t.Fatal(err)
	}
	r.h = h
	r.closers = append(r.closers, r.fails.stop)
	r.fails.last(t)
	ev := r.fails.all()[0]
	var se *storageError
	if !errors.As(ev.Err, &se) || ev.Attempt != 1 {
		t.Fatalf("failure %+v, want a storage error at the first check", ev)
	}
	// The attempt's warnings: the gate may also say, on the fake clock,
	// that no peer is connected.
	attemptWarnings := func() []logLine {
		var out []logLine
		for _, l := range warnings(r) {
			if _, ok := l.attrs["kind"]; ok {
				out = append(out, l)
			}
		}
		return out
	}
	w := attemptWarnings()
	const want = "certificate storage failed (checking that storage is writable: writing a test key); check that it is readable and writable"
	if len(w) == 0 || w[0].msg != want {
		t.Fatalf("first warning, want %q:\n%s", want, r.logs)
	}
	if w[0].attrs["kind"].String() != string(kindStorage) {
		t.Errorf("kind %v, want %s", w[0].attrs["kind"], kindStorage)
	}
	t.Logf("the operator reads: %s", w[0].text)
	clk.WaitParked(t, 30*time.Second)
	checkBackoff(t, r.retries())
	if n := len(attemptWarnings()); n != 1 {
		t.Errorf("%d warnings for one cause, want 1:\n%s", n, r.logs)
	}
	if d := f.Stats(); d.Health != before.Health || d.Challenge != before.Challenge || d.CA != before.CA {
		t.Errorf("requests to the forge while storage is broken: before %+v, after %+v", before, d)
	}
	pingOverTCP(t, f, h)
	r.closeAndCheck(t, leaks)
}

// TestStorageProbeLeavesNothing: the start-up check of a working storage
// leaves no key behind.
func TestStorageProbeLeavesNothing(t *testing.T) {
	f := startForge(t, testforge.Config{})
	r, dir, _ := startDirRig(t, f)
	r.close(t)
	entries, err := os.ReadDir(filepath.Join(dir, "autotls", "probe"))
	if err != nil {
		t.Fatalf("the check wrote no test key: %v", err)
	}
	if len(entries) != 0 {
		t.Errorf("test keys left behind: %v", entries)
	}
}

// TestMistakeCAUnreachable: a CA that cannot be reached is named as such in
// the headline, with its URL, and so is one whose HTTPS certificate is not
// trusted (the wrong roots given to WithCA).
func TestMistakeCAUnreachable(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name  string
		roots func(ca *testforge.CAProxy) *x509.CertPool
		down  bool
		want  string // after "the CA (<url>) is unreachable"
	}{
		{"nothing listens", func(ca *testforge.CAProxy) *x509.CertPool { return ca.Roots }, true, "; retrying"},
		{"wrong roots", func(*testforge.CAProxy) *x509.CertPool { return x509.NewCertPool() }, false,
			": its HTTPS certificate is not trusted here; check the roots given to WithCA and this machine's clock; retrying"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca := startCAProxy(t, f)
			if tc.down {
				ca.Close()
			}
			leaks := leakCheck(t)
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(time.Minute))
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, tc.roots(ca)))
			r.closers = append(r.closers, ca.Close)
			r.fails.last(t)
			w := warnings(r)
			want := "the CA (" + ca.URL + ") is unreachable" + tc.want
			if len(w) == 0 || w[0].msg != want {
				t.Fatalf("first warning, want %q:\n%s", want, r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			r.closeAndCheck(t, leaks)
		})
	}
}
