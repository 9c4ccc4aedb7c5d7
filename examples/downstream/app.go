// Package downstream is an application that embeds autotls, as a module of
// its own would: its test uses only the public test kit,
// github.com/p2ptls/autotls/autotlstest.
package downstream

import (
	"net/http"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"

	"github.com/p2ptls/autotls"
)

// NewNode starts the application's libp2p host, browser-dialable through
// autotls, which also serves the application's HTTPS API on the same port
// with the same certificate: GET /id answers the host's peer ID. opts and
// tlsOpts come after the application's own, so that a test can point the
// host at a local forge.
func NewNode(opts []libp2p.Option, tlsOpts ...autotls.Opt) (host.Host, error) {
	mux := http.NewServeMux()
	h, err := libp2p.New(append(opts, autotls.Option(append([]autotls.Opt{autotls.WithHTTPHandler(mux)}, tlsOpts...)...))...)
	if err != nil {
		return nil, err
	}
	mux.HandleFunc("GET /id", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(h.ID().String()))
	})
	return h, nil
}
