package browsertest_test

import (
	"context"
	"fmt"
	"time"

	"github.com/p2ptls/autotls/internal/browsertest"
)

// A test calls browsertest.Require(t) first; then one Dial is the whole
// browser side.
func ExampleDial() {
	var caRootPEM []byte // the root that signed the host's certificate
	res, err := browsertest.Dial(context.Background(), browsertest.Options{
		Multiaddr:    "/ip4/127.0.0.1/tcp/4001/tls/sni/127-0-0-1.k51qzi5uqu5d….libp2p.direct/ws/p2p/12D3KooW…",
		TrustRootPEM: caRootPEM,
		HostRules:    "MAP *.libp2p.direct 127.0.0.1",
		Timeout:      30 * time.Second,
	})
	if err != nil {
		fmt.Println("no report:", err)
		return
	}
	fmt.Println(res.OK, res.RemotePeer, res.RTTs, res.Error)
}
