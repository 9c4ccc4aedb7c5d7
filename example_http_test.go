package autotls_test

import (
	"fmt"
	"log"
	"net"
	"net/http"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2phttp "github.com/libp2p/go-libp2p/p2p/http"
	httpauth "github.com/libp2p/go-libp2p/p2p/http/auth"

	"github.com/p2ptls/autotls"
)

// A host that serves HTTPS on its WSS port with the AutoTLS certificate:
// go-libp2p's HTTP protocols (p2p/http) with their
// /.well-known/libp2p/protocols, reachable over HTTPS at the announced
// /tls/http addresses and over libp2p streams alike, and an endpoint
// behind libp2p PeerID authentication.
func ExampleWithHTTPHandler() {
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		log.Fatal(err)
	}
	// The mux exists before the host; the p2p/http host is completed once
	// the libp2p host is built.
	mux := http.NewServeMux()
	h, err := libp2p.New(
		libp2p.Identity(key),
		libp2p.ListenAddrStrings("/ip4/0.0.0.0/tcp/4001"),
		autotls.Option(autotls.WithHTTPHandler(mux)),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()

	httpHost := &libp2phttp.Host{StreamHost: h, ServeMux: mux}
	httpHost.SetHTTPHandler("/hello/1.0.0", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "hello")
	}))
	go httpHost.Serve() // serves the mux over libp2p streams; adds the well-known resource
	defer httpHost.Close()

	// PeerID auth. go-libp2p's server compares the Host header, which
	// carries the port (<name>:4001), with the TLS server name: check the
	// name here and let the handshake sign the Host header as sent.
	auth := &httpauth.ServerPeerIDAuth{
		PrivKey: key, TokenTTL: time.Hour, NoTLS: true,
		ValidHostnameFn: func(string) bool { return true }, // checked below
		Next: func(client peer.ID, w http.ResponseWriter, r *http.Request) {
			fmt.Fprintln(w, "hello", client)
		},
	}
	mux.HandleFunc("/whoami", func(w http.ResponseWriter, r *http.Request) {
		name, _, err := net.SplitHostPort(r.Host)
		if err != nil {
			name = r.Host
		}
		if r.TLS == nil || name != r.TLS.ServerName {
			http.Error(w, "Host does not match the TLS server name", http.StatusBadRequest)
			return
		}
		auth.ServeHTTP(w, r)
	})

	// Once the certificate is loaded, h.Addrs() has, next to each
	// /tls/sni/<name>/ws address, /ip4/<ip>/tcp/4001/tls/sni/<name>/http:
	// a p2p/http client given it reaches /hello/1.0.0 by name.
	for _, a := range h.Addrs() {
		fmt.Println(a)
	}
}
