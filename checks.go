package autotls

// Mistakes caught before they cost anything: at libp2p.New, or when the
// host starts.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"reflect"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
)

// optionMarker is the swarm option [Option] adds to the configuration it
// is applied to, so that a second Option finds the first: a libp2p.Config
// has no other place to keep a note in, and this one stays with the
// configuration (no package-level registry). It does nothing.
func optionMarker(*swarm.Swarm) error { return nil }

// markOption notes Option in cfg, or tells that it is there already.
func markOption(cfg *libp2p.Config) error {
	marker := reflect.ValueOf(optionMarker).Pointer()
	for _, o := range cfg.SwarmOpts {
		if o != nil && reflect.ValueOf(o).Pointer() == marker {
			return errors.New("autotls: Option is given twice; give it once, with all its options: autotls.Option(autotls.WithStorage(…), …)")
		}
	}
	cfg.SwarmOpts = append(cfg.SwarmOpts, optionMarker)
	return nil
}

// errPrivateNetwork refuses libp2p.PrivateNetwork, in any option order.
var errPrivateNetwork = errors.New("autotls: cannot be used with libp2p.PrivateNetwork: browsers cannot join a private network; remove one of the two")

// checkConfig checks the final libp2p configuration, once every option
// has been applied, before anything is built.
func (m *manager) checkConfig(cfg *libp2p.Config) error {
	if len(cfg.PSK) > 0 {
		return errPrivateNetwork
	}
	return checkListenAddrs(cfg.ListenAddrs, m.cfg.forgeDomain, m.cfg.userTLS != nil)
}

// checkListenAddrs refuses listen addresses that cannot work with autotls
// ([checkListenAddr]), and a host with none that the WSS listener can share
// a TCP port with.
func checkListenAddrs(addrs []ma.Multiaddr, forge string, userTLS bool) error {
	tcp := false
	for _, a := range addrs {
		if err := checkListenAddr(a, forge, userTLS); err != nil {
			return err
		}
		tcp = tcp || isForgeListenAddr(a, forge) || isIPTCP(a)
	}
	if tcp {
		return nil
	}
	if len(addrs) == 0 {
		return errors.New("autotls: the host has no listen address, so no TCP port to share with the WSS listener: remove libp2p.NoListenAddrs, or listen on TCP, e.g. /ip4/0.0.0.0/tcp/4001")
	}
	return fmt.Errorf("autotls: no TCP listen address to share with the WSS listener (the host listens on %s): add one, e.g. /ip4/0.0.0.0/tcp/4001, or a /ip4/0.0.0.0/tcp/443/tls/sni/*.%s/ws listen address", joinAddrs(addrs), forge)
}

// checkListenAddr refuses a listen address that cannot work with autotls:
// a forge listen address for another forge domain, or a WSS address for
// other names without [WithTLSConfig]. A mistake in one address is known
// as soon as it is given, so [Option] checks those given before it at
// once (the error then comes without fx's log records), and the rest with
// the final configuration.
func checkListenAddr(a ma.Multiaddr, forge string, userTLS bool) error {
	if isForgeListenAddr(a, forge) {
		return nil
	}
	if sni, ok := wildcardSNI(a); ok {
		return fmt.Errorf("autotls: listen address %s is for the forge domain %s, but this host uses %s: write %s", a, strings.TrimPrefix(sni, "*."), forge, withSNI(a, "*."+forge))
	}
	if !isWSS(a) || userTLS {
		return nil
	}
	hint := ""
	if len(a) >= 2 && isIPTCP(a[:2]) {
		hint = fmt.Sprintf(", or listen on %s for the forge's", withSNI(a, "*."+forge))
	}
	return fmt.Errorf("autotls: listen address %s serves Secure WebSockets for names that autotls has no certificate for: pass your certificate with autotls.WithTLSConfig%s", a, hint)
}

// isWSS reports whether a is a Secure WebSocket address: …/tls/ws,
// …/tls/sni/<name>/ws or …/wss.
func isWSS(a ma.Multiaddr) bool {
	for i, c := range a {
		switch c.Code() {
		case ma.P_WSS:
			return true
		case ma.P_WS:
			return i > 0 && (a[i-1].Code() == ma.P_TLS || (a[i-1].Code() == ma.P_SNI && i > 1 && a[i-2].Code() == ma.P_TLS))
		}
	}
	return false
}

// wildcardSNI returns the SNI of a WSS address naming a wildcard, such as
// /ip4/0.0.0.0/tcp/4001/tls/sni/*.libp2p.direct/ws: a forge listen address.
func wildcardSNI(a ma.Multiaddr) (string, bool) {
	for _, c := range a {
		if c.Code() == ma.P_SNI && strings.HasPrefix(c.Value(), "*.") {
			return c.Value(), isWSS(a)
		}
	}
	return "", false
}

// withSNI returns a's /ipX/<ip>/tcp/<port> part followed by
// /tls/sni/<sni>/ws, or a's text if a does not start so.
func withSNI(a ma.Multiaddr, sni string) string {
	if len(a) < 2 || !isIPTCP(a[:2]) {
		return "/ip4/0.0.0.0/tcp/4001/tls/sni/" + sni + "/ws"
	}
	tail, err := tlsTail(sni)
	if err != nil {
		return a.String()
	}
	return append(ma.Multiaddr{a[0], a[1]}, tail...).String()
}

func joinAddrs(addrs []ma.Multiaddr) string {
	s := make([]string, len(addrs))
	for i, a := range addrs {
		s[i] = a.String()
	}
	return strings.Join(s, ", ")
}

// releaseConfig closes what libp2p's options made for a host that will not
// be built, as libp2p does when it refuses a configuration itself.
func releaseConfig(cfg *libp2p.Config) {
	if cfg.ResourceManager != nil {
		_ = cfg.ResourceManager.Close()
	}
	if cfg.ConnManager != nil {
		_ = cfg.ConnManager.Close()
	}
	if cfg.Peerstore != nil {
		_ = cfg.Peerstore.Close()
	}
}

// checkRegistrationPath refuses a broker endpoint that names one of the
// broker's routes rather than its base URL, such as
// https://registration.libp2p.direct/v1/_acme-challenge: the routes are
// appended to it. Other paths are kept (a broker behind a path prefix).
func checkRegistrationPath(u *url.URL) error {
	p := strings.TrimRight(u.Path, "/")
	for _, route := range []string{"/v1/_acme-challenge", "/v1/health", "/v1"} {
		if base, ok := strings.CutSuffix(p, route); ok {
			b := *u
			b.Path, b.RawPath = base, ""
			return fmt.Errorf("give the broker's base URL, %s; autotls adds %s itself", b.Redacted(), route)
		}
	}
	return nil
}

// checkTCPListeners fails the host's start when no WSS listener can be
// opened: every TCP listen address failed, or no transport serves TCP.
func (m *manager) checkTCPListeners() error {
	if len(m.listen.addrs) > 0 {
		return nil
	}
	if shared := m.sharedWSS.Load(); shared != nil && len(*shared) > 0 {
		return nil
	}
	var on []ma.Multiaddr
	for _, a := range m.sw.ListenAddresses() {
		if !isRelay(a) {
			on = append(on, a)
		}
	}
	return fmt.Errorf("autotls: the host has no TCP listener to share with the WSS listener (it listens on %s): give it a TCP transport and a TCP listen address it can open, e.g. /ip4/0.0.0.0/tcp/4001", joinAddrs(on))
}

// storageProbeTimeout bounds one check that storage is writable.
const storageProbeTimeout = 30 * time.Second

// probeStorage writes a key of its own, reads it back and deletes it, so
// that storage that cannot keep a certificate is known at start rather
// than at the first issuance, which may come much later (after AutoNAT).
func (m *manager) probeStorage(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, storageProbeTimeout)
	defer cancel()
	nonce := make([]byte, 8)
	_, _ = rand.Read(nonce)
	key := "autotls/probe/" + certmagic.StorageKeys.Safe(m.domain) + "-" + hex.EncodeToString(nonce)
	value := []byte("autotls checks that this storage is writable; this key is deleted at once\n" + hex.EncodeToString(nonce))
	s := m.cfg.storage
	if err := s.Store(ctx, key, value); err != nil {
		return &storageError{op: "checking that storage is writable: writing a test key", err: err}
	}
	got, err := s.Load(ctx, key)
	if err == nil && !bytes.Equal(got, value) {
		err = errors.New("read back something else than was written")
	}
	if err != nil {
		_ = s.Delete(ctx, key)
		return &storageError{op: "checking that storage is writable: reading a test key back", err: err}
	}
	if err := s.Delete(ctx, key); err != nil {
		return &storageError{op: "checking that storage is writable: deleting a test key", err: err}
	}
	return nil
}

// checkStorage probes storage at start, before any gate, and again after
// each failure with the backoff of a failed attempt, until it works. It
// returns false when the host is closing.
func (m *manager) checkStorage(ctx context.Context, st *runState) bool {
	for {
		err := m.probeStorage(ctx)
		if err == nil {
			if st.attempt > 0 {
				st.attempt, st.retryAt, st.lastKey, st.last = 0, time.Time{}, "", ""
			}
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		if sleep(ctx, m.clock, m.fail(ctx, st, err)) != nil {
			return false
		}
	}
}

// caUnreachable tells whether err, from talking to the CA, means that no
// answer came (a name that does not resolve, a refused, reset or timed
// out connection, a failed TLS handshake), and the sentence that says
// why, for the CA named caName.
func caUnreachable(err error, caName string) (string, bool) {
	var (
		dnsErr  *net.DNSError
		unknown x509.UnknownAuthorityError
		host    x509.HostnameError
		invalid x509.CertificateInvalidError
		verify  *tls.CertificateVerificationError
		opErr   *net.OpError
		netErr  net.Error
		record  tls.RecordHeaderError
	)
	switch {
	case errors.As(err, &dnsErr):
		return caName + " is unreachable: its name does not resolve (" + dnsErr.Name + "); check the URL given to WithCA and this machine's DNS; retrying", true
	case errors.As(err, &unknown), errors.As(err, &host), errors.As(err, &invalid), errors.As(err, &verify):
		return caName + " is unreachable: its HTTPS certificate is not trusted here; check the roots given to WithCA and this machine's clock; retrying", true
	case errors.As(err, &record):
		return caName + " is unreachable: it does not speak HTTPS at that address; check the URL given to WithCA; retrying", true
	case errors.As(err, &opErr), errors.As(err, &netErr),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return caName + " is unreachable; retrying", true
	}
	return "", false
}
