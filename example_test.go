package autotls_test

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log"

	"github.com/libp2p/go-libp2p"

	"github.com/p2ptls/autotls"
)

// A host that obtains a certificate from Let's Encrypt through
// libp2p.direct once it is publicly reachable, and announces
// browser-dialable /tls/sni/.../ws addresses while the certificate is valid.
func ExampleOption() {
	h, err := libp2p.New(
		libp2p.ListenAddrStrings("/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"),
		autotls.Option(autotls.WithEmail("ops@example.net")),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()

	// The certificate's state is on the host's event bus.
	sub, err := h.EventBus().Subscribe(new(autotls.EvtCertificateLoaded))
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close()
	ev := (<-sub.Out()).(autotls.EvtCertificateLoaded)
	fmt.Println("serving", ev.Names, "until", ev.NotAfter)
	for _, a := range h.Addrs() {
		fmt.Printf("%s/p2p/%s\n", a, h.ID())
	}
}

// A host that already serves Secure WebSockets on a domain of its own
// keeps doing so, with the forge's certificate next to its own on the same
// listeners: the configuration once given to websocket.WithTLSConfig goes
// to WithTLSConfig.
func ExampleWithTLSConfig() {
	own, err := tls.LoadX509KeyPair("example.com.crt", "example.com.key")
	if err != nil {
		log.Fatal(err)
	}
	h, err := libp2p.New(
		libp2p.ListenAddrStrings("/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/tcp/443/tls/ws"),
		autotls.Option(autotls.WithTLSConfig(&tls.Config{Certificates: []tls.Certificate{own}})),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
}

// Failures of the broker carry its status, an excerpt of its answer and
// its Retry-After.
func ExampleBrokerError() {
	var err error = &autotls.BrokerError{Op: "register", StatusCode: 429, Body: "slow down"}
	var be *autotls.BrokerError
	if errors.As(err, &be) && be.Temporary() {
		fmt.Println("broker busy; status", be.StatusCode)
	}
	// Output: broker busy; status 429
}

// A program follows what the certificate manager is doing: the current
// status arrives at once, then each change.
func ExampleEvtStatusChanged() {
	h, err := libp2p.New(autotls.Option())
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()

	sub, err := h.EventBus().Subscribe(new(autotls.EvtStatusChanged))
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close()
	for e := range sub.Out() {
		s := e.(autotls.EvtStatusChanged).Status
		fmt.Println(s) // e.g. "waiting_reachability: waiting for AutoNAT to confirm a publicly reachable TCP address"
		if s.State == autotls.StateValid {
			break
		}
	}
}
