package autotls

import (
	_ "github.com/caddyserver/certmagic"
	_ "github.com/ipfs/go-cid"
	_ "github.com/letsencrypt/pebble/v2/ca"
	_ "github.com/letsencrypt/pebble/v2/db"
	_ "github.com/letsencrypt/pebble/v2/va"
	_ "github.com/letsencrypt/pebble/v2/wfe"
	_ "github.com/libp2p/go-libp2p"
	_ "github.com/libp2p/go-libp2p/p2p/http/auth"
	_ "github.com/libp2p/go-libp2p/p2p/protocol/ping"
	_ "github.com/libp2p/go-libp2p/p2p/transport/websocket"
	_ "github.com/mholt/acmez/v3"
	_ "github.com/miekg/dns"
	_ "github.com/multiformats/go-multiaddr-dns"
	_ "github.com/multiformats/go-multibase"
	_ "go.uber.org/fx"
)
