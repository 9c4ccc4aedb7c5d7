package autotls

import (
	"crypto/tls"
	"errors"
	"reflect"

	ws "github.com/libp2p/go-libp2p/p2p/transport/websocket"
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
