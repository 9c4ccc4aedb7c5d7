package browsertest_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/autotlstest"
	"github.com/p2ptls/autotls/internal/browsertest"
)

// TestBrowserFetchesHTTPS: a host built with autotls.WithHTTPHandler
// serves HTTPS on its WSS port. Headless Chromium, trusting the forge's
// root, dials the /ws address with js-libp2p and, at the same time,
// fetch()es the URL of the announced /http address cross-origin: the body
// is the handler's, over HTTP/2. Without the root the fetch fails on
// certificate trust.
func TestBrowserFetchesHTTPS(t *testing.T) {
	browsertest.Require(t)
	f := autotlstest.New(t)
	rootPEM, err := os.ReadFile(f.RootPEMFile(t))
	if err != nil {
		t.Fatal(err)
	}
	var id string
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Access-Control-Allow-Origin", "*")
		w.Header().Set("Timing-Allow-Origin", "*")
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{"peer": id, "path": r.URL.Path, "proto": r.Proto})
	})
	h, err := libp2p.New(append(f.HostOptions(), autotls.Option(append(f.Options(), autotls.WithHTTPHandler(handler))...))...)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	id = h.ID().String()
	wsAddr := f.WaitBrowserAddr(t, h)

	var fetchURL string
	for _, a := range h.Addrs() {
		name, err1 := a.ValueForProtocol(ma.P_SNI)
		port, err2 := a.ValueForProtocol(ma.P_TCP)
		if _, err := a.ValueForProtocol(ma.P_HTTP); err == nil && err1 == nil && err2 == nil {
			fetchURL = fmt.Sprintf("https://%s:%s/info", name, port)
			break
		}
	}
	if fetchURL == "" {
		t.Fatalf("no /tls/sni/…/http address announced: %v", h.Addrs())
	}
	want := fmt.Sprintf(`{"path":"/info","peer":%q,"proto":"HTTP/2.0"}`, id)

	res, err := browsertest.Dial(context.Background(), browsertest.Options{
		Multiaddr:    wsAddr.String() + "/p2p/" + id,
		FetchURL:     fetchURL,
		TrustRootPEM: rootPEM,
		HostRules:    "MAP *." + f.Domain() + " 127.0.0.1",
	})
	if err != nil {
		t.Fatalf("browser: %v", err)
	}
	if !res.OK || res.RemotePeer != id {
		t.Fatalf("browser dial of %s: %+v", wsAddr, res)
	}
	if res.Fetch == nil || !res.Fetch.OK || res.Fetch.Status != 200 || strings.TrimSpace(res.Fetch.Body) != want || res.Fetch.Protocol != "h2" {
		t.Fatalf("browser fetch of %s: %+v; want 200 over h2 with %s", fetchURL, res.Fetch, want)
	}
	t.Logf("browser pinged %s (RTTs %v ms) and fetched %s over %s: %s", wsAddr, res.RTTs, fetchURL, res.Fetch.Protocol, res.Fetch.Body)

	res, err = browsertest.Dial(context.Background(), browsertest.Options{
		FetchURL:  fetchURL,
		HostRules: "MAP *." + f.Domain() + " 127.0.0.1",
	})
	if err != nil {
		t.Fatalf("browser (untrusted root): %v", err)
	}
	if res.Fetch == nil || res.Fetch.OK || !strings.Contains(res.Fetch.Error, "ERR_CERT_AUTHORITY_INVALID") {
		t.Fatalf("with the forge's root untrusted the fetch gave %+v; want a certificate authority error", res.Fetch)
	}
}
