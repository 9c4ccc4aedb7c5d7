package autotlstest_test

// The examples are test bodies: t stands for the *testing.T of the test
// they are written in. They are compiled, not run (they have no output);
// faults_test.go and http_test.go run the same steps.

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/autotlstest"
	"github.com/p2ptls/autotls/storage"
)

// A host under test gets a certificate, and a peer that trusts only the
// forge's CA dials its browser address over Secure WebSockets and pings.
func Example() {
	var t *testing.T // the test's t

	f := autotlstest.New(t)
	h, err := libp2p.New(append(f.HostOptions(), autotls.Option(f.Options()...))...)
	if err != nil {
		t.Fatal(err)
	}
	addr := f.WaitBrowserAddr(t, h) // /ip4/127.0.0.1/tcp/…/tls/sni/127-0-0-1.<peerid>.libp2p.direct/ws

	p := f.NewPeer(t)
	if err := p.Connect(t.Context(), peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{addr}}); err != nil {
		t.Fatal(err)
	}
	res := <-ping.Ping(t.Context(), p, h.ID())
	if res.Error != nil {
		t.Fatal(res.Error)
	}
	t.Logf("pinged %s over %s in %v", h.ID(), addr, res.RTT)
}

// A host that serves HTTP (autotls.WithHTTPHandler) is fetched over HTTPS
// and HTTP/2 by the name on its certificate, with a client that trusts
// only the forge's CA and resolves through the forge's DNS.
func ExampleForge_HTTPClient() {
	var t *testing.T // the test's t

	f := autotlstest.New(t)
	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "hello") })
	h, err := libp2p.New(append(f.HostOptions(), autotls.Option(append(f.Options(), autotls.WithHTTPHandler(mux))...))...)
	if err != nil {
		t.Fatal(err)
	}
	addr := f.WaitHTTPAddr(t, h)        // /ip4/127.0.0.1/tcp/<port>/tls/sni/127-0-0-1.<peerid>.libp2p.direct/http
	url := autotlstest.HTTPURL(t, addr) // https://127-0-0-1.<peerid>.libp2p.direct:<port>

	resp, err := f.HTTPClient().Get(url + "/hello")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.Proto != "HTTP/2.0" {
		t.Fatalf("%s %s %q: %v", resp.Proto, resp.Status, body, err)
	}
	t.Logf("%s says %s", url, body)
}

// While the broker is down the host reports the failure and keeps its
// other transports; once it is back, the host gets its certificate.
func ExampleForge_BrokerDown() {
	var t *testing.T // the test's t

	f := autotlstest.New(t)
	f.BrokerDown()
	h, err := libp2p.New(append(f.HostOptions(), autotls.Option(f.Options()...))...)
	if err != nil {
		t.Fatal(err)
	}
	ev := f.WaitIssuanceFailed(t, h)
	t.Logf("while the broker is down: %v (next try at %v)", ev.Err, ev.NextRetry)

	f.BrokerUp()
	f.WaitBrowserAddr(t, h)
}

// The broker is overloaded for a while: 503 with Retry-After: 1.
func ExampleForge_FailBroker() {
	var t *testing.T // the test's t

	f := autotlstest.New(t)
	f.FailBroker(1000, http.StatusServiceUnavailable, time.Second)
	h, err := libp2p.New(append(f.HostOptions(), autotls.Option(f.Options()...))...)
	if err != nil {
		t.Fatal(err)
	}
	var be *autotls.BrokerError
	if ev := f.WaitIssuanceFailed(t, h); !errors.As(ev.Err, &be) || be.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("failure %v, want the broker's 503", ev.Err)
	}

	f.FailBroker(0, 0, 0) // the broker recovers; the host retries a second later
	f.WaitBrowserAddr(t, h)
}

// The forge's DNS answers the challenge's TXT record late: the host waits
// for it before it asks the CA to validate.
func ExampleForge_DelayTXT() {
	var t *testing.T // the test's t

	f := autotlstest.New(t)
	f.DelayTXT(time.Hour)
	h, err := libp2p.New(append(f.HostOptions(), autotls.Option(f.Options()...))...)
	if err != nil {
		t.Fatal(err)
	}
	for f.Stats().TXT == 0 { // the host is looking its record up
		time.Sleep(10 * time.Millisecond)
	}

	f.DelayTXT(0)
	f.WaitBrowserAddr(t, h)
}

// The CA's rate limit: new orders are refused for two seconds, and the
// host comes back at the time the CA named.
func ExampleForge_RateLimitCA() {
	var t *testing.T // the test's t

	f := autotlstest.New(t)
	f.RateLimitCA(2 * time.Second)
	h, err := libp2p.New(append(f.HostOptions(), autotls.Option(f.Options()...))...)
	if err != nil {
		t.Fatal(err)
	}
	ev := f.WaitIssuanceFailed(t, h)
	t.Logf("rate limited: %v; next try at %v", ev.Err, ev.NextRetry)

	f.WaitBrowserAddr(t, h) // the limit lifts by itself
}

// The broker cannot dial the host back, as when its port is closed to the
// internet. autotls waits at least 15 minutes before it tries again, so
// the test restarts the host, with the same identity and storage, once
// the port is "open".
func ExampleForge_RefuseDialBack() {
	var t *testing.T // the test's t

	f := autotlstest.New(t)
	f.RefuseDialBack(true)
	key, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	opts := append(f.Options(), autotls.WithStorage(storage.Memory())) // a later WithStorage wins
	h, err := libp2p.New(append(f.HostOptions(), libp2p.Identity(key), autotls.Option(opts...))...)
	if err != nil {
		t.Fatal(err)
	}
	var be *autotls.BrokerError
	if ev := f.WaitIssuanceFailed(t, h); !errors.As(ev.Err, &be) || !be.Unreachable() {
		t.Fatalf("failure %v, want the broker's failed dial-back", ev.Err)
	}
	fmt.Println(be.Body) // error testing addresses: failed to dial: …

	f.RefuseDialBack(false)
	_ = h.Close()
	h, err = libp2p.New(append(f.HostOptions(), libp2p.Identity(key), autotls.Option(opts...))...)
	if err != nil {
		t.Fatal(err)
	}
	f.WaitBrowserAddr(t, h)
}

// Certificates valid for four seconds: the host renews one within the
// test, and its browser address stays.
func ExampleWithCertValidity() {
	var t *testing.T // the test's t

	f := autotlstest.New(t, autotlstest.WithCertValidity(4*time.Second))
	h, err := libp2p.New(append(f.HostOptions(), autotls.Option(f.Options()...))...)
	if err != nil {
		t.Fatal(err)
	}
	sub, err := h.EventBus().Subscribe(new(autotls.EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	for {
		select {
		case e := <-sub.Out():
			if ev := e.(autotls.EvtCertificateLoaded); ev.Source == autotls.Renewed {
				t.Logf("renewed; valid until %v", ev.NotAfter)
				f.WaitBrowserAddr(t, h)
				return
			}
		case <-ctx.Done():
			t.Fatal("no renewal")
		}
	}
}

// A browser test trusts the forge's root from a file.
func ExampleForge_RootPEMFile() {
	var t *testing.T // the test's t

	f := autotlstest.New(t)
	root := f.RootPEMFile(t)
	// e.g. certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n autotlstest -i root
	t.Logf("trust %s; map *.%s to 127.0.0.1", root, f.Domain())
}
