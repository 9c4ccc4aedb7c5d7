package autotls

import (
	"crypto/tls"
	"errors"
	"net"
	"reflect"
	"slices"

	ws "github.com/libp2p/go-libp2p/p2p/transport/websocket"
	ma "github.com/multiformats/go-multiaddr"
)

// WithTLSConfig hands the WSS listeners the TLS configuration that serves
// your own names, for a host that serves Secure WebSockets on a domain of
// its own (a /tls/ws, /tls/sni/<name>/ws or /wss listen address, such as
// /dns4/example.com/tcp/443/tls/ws) next to the forge's. It is the
// configuration you would otherwise give to websocket.WithTLSConfig, whose
// transport [Option] replaces: its Certificates, GetCertificate or
// GetConfigForClient serve every handshake whose server name is not under
// *.<peerid>.<forge>, on every WSS listener, with its other settings
// (MinVersion, ClientAuth, ...); handshakes for the forge's names get the
// forge certificate. Do not modify conf once the host is built.
//
// Without it, only the forge's names are served, and [Option] refuses at
// libp2p.New a WSS listen address for other names and a WebSocket
// transport given with websocket.WithTLSConfig, which could only fail
// every handshake.
func WithTLSConfig(conf *tls.Config) Opt {
	return func(c *config) error {
		if conf == nil {
			return errors.New("WithTLSConfig(nil): pass the *tls.Config that serves your own names")
		}
		if len(conf.Certificates) == 0 && conf.GetCertificate == nil && conf.GetConfigForClient == nil {
			return errors.New("WithTLSConfig: the configuration has no certificate; set Certificates, GetCertificate or GetConfigForClient")
		}
		c.userTLS = conf
		return nil
	}
}

// configForClient picks the configuration of a handshake on a WSS
// listener: ours (nil) for a name the forge certificate covers, the
// user's for any other. It is only installed with [WithTLSConfig].
func (m *manager) configForClient(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	if coveredBy(hello.ServerName, m.domain) {
		return nil, nil
	}
	u := m.cfg.userTLS
	if u.GetConfigForClient != nil {
		if c, err := u.GetConfigForClient(hello); err != nil || c != nil {
			return c, err
		}
	}
	return u, nil
}

// noteReplaced records a mistake about a WebSocket transport that
// [Option] replaces: one with its own listener TLS configuration, which
// would be silently dropped. go-libp2p keeps that configuration in an
// unexported field; reflect reads whether it is set (and where it
// points) without touching it. Should the field ever be renamed, the
// check finds nothing and the transport is replaced as before.
func (m *manager) noteReplaced(t *ws.WebsocketTransport) {
	f := reflect.ValueOf(t).Elem().FieldByName("tlsConf")
	if !f.IsValid() || f.Kind() != reflect.Pointer || f.IsNil() {
		return
	}
	if m.cfg.userTLS != nil && f.Pointer() == reflect.ValueOf(m.cfg.userTLS).Pointer() {
		return // the same configuration, handed to us too
	}
	if m.setupErr == nil {
		m.setupErr = errors.New("autotls: a WebSocket transport given with websocket.WithTLSConfig is replaced by autotls's, and its certificate would never be served: pass that *tls.Config to autotls.WithTLSConfig instead")
	}
}

// userWSSOn reports whether the host has a WSS listener of the user's
// (not a forge listen address) on tcp's IP and port. Only one TLS listener
// can share a TCP port, so the forge's names are served there, by that
// listener, rather than by one of ours.
func (m *manager) userWSSOn(tcp ma.Multiaddr) bool {
	for _, a := range m.sw.ListenAddresses() {
		if p, ok := m.userWSSPort(a); ok && p.Equal(tcp) {
			return true
		}
	}
	return false
}

// userWSSPort returns the /ipX/<ip>/tcp/<port> of a, a WSS address of the
// user's (not a forge listen address).
func (m *manager) userWSSPort(a ma.Multiaddr) (ma.Multiaddr, bool) {
	if !isWSS(a) || isForgeListenAddr(a, m.cfg.forgeDomain) || len(a) < 2 || !isIPTCP(a[:2]) {
		return nil, false
	}
	return a[:2], true
}

// announceShared wraps the user's address factory: for each address of a
// user's WSS listener that serves the forge's names too (planListeners),
// it adds the forge listen address of the same IP and port, which the
// address rewriting then announces in the browser-dialable form while the
// certificate is valid, as it does for our own listeners.
func (m *manager) announceShared(user func([]ma.Multiaddr) []ma.Multiaddr) func([]ma.Multiaddr) []ma.Multiaddr {
	return func(in []ma.Multiaddr) []ma.Multiaddr {
		var extra []ma.Multiaddr
		if shared := m.sharedWSS.Load(); shared != nil {
			for _, a := range in {
				p, ok := m.userWSSPort(a)
				if !ok || !onPortOf(p, *shared) {
					continue
				}
				if w, ok := wssListenAddr(p, m.cfg.forgeDomain); ok && !slices.ContainsFunc(extra, w.Equal) {
					extra = append(extra, w)
				}
			}
		}
		if user != nil {
			in = user(in)
		}
		if len(extra) == 0 {
			return in
		}
		return append(slices.Clone(in), extra...)
	}
}

// onPortOf reports whether the /ipX/<ip>/tcp/<port> address a is on one of
// the listen addresses ls (of the same form): the same port, and the same
// IP or an unspecified one of the same family.
func onPortOf(a ma.Multiaddr, ls []ma.Multiaddr) bool {
	for _, l := range ls {
		if l[0].Code() != a[0].Code() || l[1].Value() != a[1].Value() {
			continue
		}
		if l[0].Value() == a[0].Value() || net.ParseIP(l[0].Value()).IsUnspecified() {
			return true
		}
	}
	return false
}
