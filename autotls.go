// Package autotls makes a go-libp2p host dialable from web browsers.
//
// Browsers only speak TLS with a certificate from a public CA, and a CA only
// issues for domain names, which libp2p peers do not have. With [Option], a
// host obtains a certificate for *.<peerid>.libp2p.direct from Let's
// Encrypt through the AutoTLS broker (which fulfils the ACME DNS-01
// challenge after checking, with a libp2p dial-back, that the host owns its
// PeerID and is reachable), serves Secure WebSockets with it, and announces
// addresses such as
//
//	/ip4/203.0.113.1/tcp/4001/tls/sni/203-0-113-1.k51qzi5uqu5d….libp2p.direct/ws
//
// which js-libp2p in a browser dials directly: no gateway, no WebRTC
// signalling. The forge's DNS answers 203-0-113-1.<peerid>.libp2p.direct
// with 203.0.113.1 without any registration.
//
//	h, err := libp2p.New(autotls.Option())
//
// It does not make a host reachable: the host needs a public IP address or
// a forwarded TCP port, and waits until AutoNAT confirms one before asking
// for a certificate. It does not run the broker or the forge's DNS.
//
// Keep the identity key and the storage ([WithStorage]) persistent. Let's
// Encrypt issues at most five certificates for the same name per week, and
// the name is derived from the PeerID: a node that loses its storage on
// every restart is soon refused for days.
package autotls

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/transport"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	"github.com/libp2p/go-libp2p/p2p/transport/tcpreuse"
	ws "github.com/libp2p/go-libp2p/p2p/transport/websocket"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/fx"
)

// Option returns a libp2p option that gives the host a browser-trusted
// certificate and Secure WebSocket listeners. It adds to the host:
//
//   - a WebSocket transport serving the certificate, and your own for
//     other names with [WithTLSConfig] (it replaces a WebSocket transport
//     configured elsewhere; other transports, given or default, are kept);
//   - a WSS listener /ipX/<ip>/tcp/<port>/tls/sni/*.<forge>/ws on the IP and
//     port of every TCP listener, sharing the TCP port (it turns on
//     libp2p.ShareTCPListener), or exactly the /tls/sni/*.<forge>/ws listen
//     addresses given with libp2p.ListenAddrs, if any. The listeners are open
//     while a valid certificate is loaded. Where a WSS listen address of
//     your own holds a TCP listener's port, that listener serves the
//     forge's names instead;
//   - an address factory, run after any given with libp2p.AddrsFactory,
//     that announces those listeners as browser-dialable addresses while
//     the certificate is valid (public ones only unless
//     [WithAllowPrivateAddrs]);
//   - AutoNAT v2 (libp2p.EnableAutoNATv2), unless [WithAllowPrivateAddrs]:
//     it confirms each address separately, which tells an open TCP port
//     (what browsers dial) from an open QUIC port; AutoNAT v1 cannot. The
//     host then also answers other peers' AutoNAT v2 requests, within
//     go-libp2p's rate limits (60 a minute);
//   - a certificate manager started and stopped with the host: it serves a
//     stored certificate at once, otherwise waits for the registration
//     delay, public reachability and broker health, obtains one, and renews it
//     before it expires, after the same reachability and broker checks.
//     Its state is published on the host's event bus as
//     [EvtCertificateLoaded], [EvtCertificateExpired],
//     [EvtIssuanceFailed], [EvtReachabilityChanged] and [EvtStatusChanged]
//     ([StatusOf] reads it), and as Prometheus metrics on the host's
//     registerer (none under libp2p.DisableMetrics).
//
// Public reachability means a public TCP address confirmed by AutoNAT v2,
// or AutoNAT v1's Public when it can only concern TCP (the host has no
// public QUIC or other UDP address) or was forced with
// libp2p.ForceReachabilityPublic, as long as AutoNAT v2 has not found the
// TCP address unreachable. AutoNAT asks connected peers to dial the host:
// connect the host to some (the network's bootstrap peers, for example),
// or use libp2p.ForceReachabilityPublic on a server known to be public.
// Only the confirmed plain TCP addresses are sent to the broker for its
// dial-back.
//
// Mistakes are refused at libp2p.New, whatever the option order, with an
// error that names autotls and says what to change: an invalid Opt,
// Option given twice, libp2p.PrivateNetwork (browsers cannot join a
// private network), no TCP listen address for the WSS listener to share,
// a /tls/sni/*.<domain>/ws listen address for another forge domain, and a
// WSS listen address or a websocket.WithTLSConfig for names of your own
// without [WithTLSConfig]. A host whose TCP listeners all failed to open
// fails to start. Storage is checked at start: if it cannot be written,
// that is said at once (and retried like a failed attempt), while the
// host's other transports work on.
func Option(opts ...Opt) libp2p.Option {
	return func(cfg *libp2p.Config) error {
		c, err := newConfig(opts)
		if err != nil {
			return fmt.Errorf("autotls: %w", err)
		}
		if err := markOption(cfg); err != nil {
			return err
		}
		if len(cfg.PSK) > 0 {
			return errPrivateNetwork
		}
		for _, a := range cfg.ListenAddrs {
			if err := checkListenAddr(a, c.forgeDomain, c.userTLS != nil); err != nil {
				return err
			}
		}
		m := newManager(c)
		if !c.allowPrivate {
			// The reachability gate needs AutoNAT v2's per-address
			// verdicts: v1's cannot tell TCP from QUIC.
			cfg.EnableAutoNATv2 = true
		}
		var once sync.Once
		cfg.UserFxOptions = append(cfg.UserFxOptions,
			// A module's invokes run before the root's, which build the
			// host: the configuration is final (every option applied),
			// and nothing is built yet.
			fx.Module("autotls", fx.Invoke(func() error {
				if err := m.checkConfig(cfg); err != nil {
					releaseConfig(cfg)
					return err
				}
				return nil
			})),
			fx.Decorate(shareTCP),
			// Runs while the host is being built, after every libp2p option
			// (in any order) has been applied: the moment to wrap the final
			// address factory and take our listen addresses.
			fx.Decorate(func(b event.Bus) event.Bus {
				once.Do(func() { m.configure(cfg) })
				return b
			}),
			fx.Decorate(fx.Annotate(m.transports,
				fx.ParamTags(`group:"transport"`),
				fx.ResultTags(`group:"transport"`))),
			fx.Invoke(func(h host.Host, sw *swarm.Swarm, key crypto.PrivKey, lc fx.Lifecycle) error {
				if m.setupErr != nil {
					_ = h.Close()
					releaseConfig(cfg)
					return m.setupErr
				}
				if err := m.attach(h, sw, key); err != nil {
					return fmt.Errorf("autotls: %w", err)
				}
				lc.Append(fx.Hook{
					OnStart: func(ctx context.Context) error {
						err := m.onStart(ctx)
						if err != nil {
							// libp2p.New returns the error without
							// closing what it started.
							_ = h.Close()
							releaseConfig(cfg)
						}
						return err
					},
					OnStop: m.onStop,
				})
				return nil
			}),
		)
		return nil
	}
}

// shareTCP turns go-libp2p's shared TCP listener on (as
// libp2p.ShareTCPListener does), so that a WSS listener can share the
// port of a TCP listener. Doing it here rather than in the configuration
// lets [Option]'s own check refuse a libp2p.PrivateNetwork given after it
// (go-libp2p refuses a private network with a shared listener first, in
// words that do not name autotls).
func shareTCP(cm *tcpreuse.ConnMgr, u transport.Upgrader) *tcpreuse.ConnMgr {
	if cm != nil {
		return cm
	}
	return tcpreuse.NewConnMgr(tcpreuse.EnvReuseportVal, u)
}

// configure takes the final libp2p configuration: it wraps the address
// factory and keeps the user's forge listen addresses for itself (they are
// opened once a certificate is loaded).
func (m *manager) configure(cfg *libp2p.Config) {
	cfg.AddrsFactory = m.wrapAddrsFactory(m.announceShared(cfg.AddrsFactory))
	m.takeRegisterer(cfg)
	m.configureGate(cfg)
	var keep []ma.Multiaddr
	for _, a := range cfg.ListenAddrs {
		if isForgeListenAddr(a, m.cfg.forgeDomain) {
			m.userWSS = append(m.userWSS, a)
			continue
		}
		keep = append(keep, a)
	}
	if len(m.userWSS) > 0 {
		cfg.ListenAddrs = keep
	}
}

// transports puts a WebSocket transport that serves our certificate in the
// host's transport set, in place of any other WebSocket transport.
func (m *manager) transports(tpts []transport.Transport, u transport.Upgrader, rcmgr network.ResourceManager, shared *tcpreuse.ConnMgr) ([]transport.Transport, error) {
	out := make([]transport.Transport, 0, len(tpts)+1)
	for _, t := range tpts {
		if w, ok := t.(*ws.WebsocketTransport); ok {
			m.noteReplaced(w)
			continue
		}
		out = append(out, t)
	}
	w, err := ws.New(u, rcmgr, shared, append([]ws.Option{ws.WithTLSConfig(m.tlsConfig())}, m.httpOptions()...)...)
	if err != nil {
		return nil, fmt.Errorf("autotls: creating the WebSocket transport: %w", err)
	}
	return append(out, w), nil
}

// tlsConfig is the server configuration of the WSS listeners: the current
// certificate, picked per handshake so that a renewal needs no restart.
func (m *manager) tlsConfig() *tls.Config {
	c := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: m.getCertificate,
	}
	if m.cfg.userTLS != nil {
		c.GetConfigForClient = m.configForClient
	}
	return c
}

var errNoCertificate = errors.New("autotls: no certificate loaded yet")

// getCertificate returns the certificate for a ClientHello naming
// <label>.<peerid>.<forge>, the only names the wildcard covers.
func (m *manager) getCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	c := m.cert.Load()
	if c == nil {
		return nil, errNoCertificate
	}
	if !coveredBy(hello.ServerName, m.domain) {
		return nil, fmt.Errorf("autotls: no certificate for server name %q", hello.ServerName)
	}
	return c.tls, nil
}
