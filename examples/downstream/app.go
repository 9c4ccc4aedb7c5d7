// Package downstream is an application that embeds autotls, as a module of
// its own would: its test uses only the public test kit,
// github.com/p2ptls/autotls/autotlstest.
package downstream

import (
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"

	"github.com/p2ptls/autotls"
)

// NewNode starts the application's libp2p host, browser-dialable through
// autotls. opts and tlsOpts come after the application's own, so that a
// test can point the host at a local forge.
func NewNode(opts []libp2p.Option, tlsOpts ...autotls.Opt) (host.Host, error) {
	return libp2p.New(append(opts, autotls.Option(tlsOpts...))...)
}
