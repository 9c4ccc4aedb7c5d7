package autotls

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ws "github.com/libp2p/go-libp2p/p2p/transport/websocket"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// ownCA is a certificate authority made for one test, standing for the
// one that issued a user's certificate for their own domain.
type ownCA struct {
	key   *ecdsa.PrivateKey
	cert  *x509.Certificate
	roots *x509.CertPool
}

func newOwnCA(t *testing.T) *ownCA {
	t.Helper()
	key := ecdsaKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "autotls test root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(nil, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	return &ownCA{key: key, cert: cert, roots: roots}
}

// issue returns a certificate for name signed by the CA.
func (ca *ownCA) issue(t *testing.T, name string) tls.Certificate {
	t.Helper()
	key := ecdsaKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(nil, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestOwnCertificate: with WithTLSConfig, the user's certificate for their
// own name and the forge certificate from Pebble are both served, chosen
// by server name, on the user's own /tls/ws listener and on the forge's
// WSS listener alike; a libp2p host dials the user's name over WSS, and
// another the announced forge address, and pings cross. The same
// configuration given to websocket.WithTLSConfig as well is accepted.
func TestOwnCertificate(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	ca := newOwnCA(t)
	const ownName = "node.example.test"
	cert := ca.issue(t, ownName)
	own := &tls.Config{Certificates: []tls.Certificate{cert}}
	// As autocert's and certmagic's configurations are: a function.
	ownFunc := &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &cert, nil }}
	for _, tc := range []struct {
		name   string
		conf   *tls.Config
		listen string // the user's WSS listen address
		shared bool   // on the port of the host's TCP listener
		extra  []libp2p.Option
	}{
		{"own port", own, "/ip4/127.0.0.2/tcp/0/tls/ws", false, nil},
		// Port 0 of the same IP: go-libp2p's shared TCP listener puts
		// both on one port, where only one TLS listener can be: the
		// user's, which serves the forge's names too.
		{"port of the TCP listener", own, "/ip4/127.0.0.1/tcp/0/tls/ws", true, nil},
		{"GetCertificate, and the same config to websocket.WithTLSConfig", ownFunc, "/ip4/127.0.0.2/tcp/0/tls/ws", false,
			[]libp2p.Option{libp2p.Transport(tcp.NewTCPTransport), libp2p.Transport(ws.New, ws.WithTLSConfig(ownFunc))}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := append([]libp2p.Option{libp2p.ListenAddrStrings(tc.listen)}, tc.extra...)
			h := newHost(t, f, opts, WithStorage(storage.Memory()), WithTLSConfig(tc.conf))
			waitCert(t, h, 30*time.Second)
			forgeAddr := waitBrowserAddr(t, h, f.Domain, "/ip4/127.0.0.1/")
			forgeSNI := "127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + f.Domain

			var ownAddr, forgeListener ma.Multiaddr
			for _, a := range h.Network().ListenAddresses() {
				switch {
				case isForgeListenAddr(a, f.Domain):
					forgeListener = a
				case isWSS(a):
					ownAddr = a
				}
			}
			if ownAddr == nil || (forgeListener == nil) != tc.shared {
				t.Fatalf("want the user's /tls/ws listener and the forge's unless they share a port, have %v", h.Network().ListenAddresses())
			}
			for _, l := range []ma.Multiaddr{ownAddr, forgeListener} {
				if l == nil {
					continue
				}
				hp := tcpHostPort(t, l)
				st, err := tlsHandshake(hp, ownName, ca.roots)
				if err != nil {
					t.Fatalf("handshake for %s on %s: %v", ownName, l, err)
				}
				if got := st.PeerCertificates[0].DNSNames; len(got) != 1 || got[0] != ownName {
					t.Fatalf("%s on %s served %v", ownName, l, got)
				}
				st, err = tlsHandshake(hp, forgeSNI, f.IssuerRoots)
				if err != nil {
					t.Fatalf("handshake for %s on %s: %v", forgeSNI, l, err)
				}
				if got, want := st.PeerCertificates[0].DNSNames, f.CertName(h.ID()); len(got) != 1 || got[0] != want {
					t.Fatalf("%s on %s served %v, want %s", forgeSNI, l, got, want)
				}
			}

			// A libp2p host that trusts the user's CA dials the user's
			// name on their own listener.
			d, err := libp2p.New(
				libp2p.NoListenAddrs,
				libp2p.ConnectionGater(testforge.LoopbackGater()),
				libp2p.Transport(tcp.NewTCPTransport),
				libp2p.Transport(ws.New, ws.WithTLSClientConfig(&tls.Config{RootCAs: ca.roots})),
			)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			tail, err := tlsTail(ownName)
			if err != nil {
				t.Fatal(err)
			}
			dial := append(ma.Multiaddr{ownAddr[0], ownAddr[1]}, tail...)
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			if err := d.Connect(ctx, peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{dial}}); err != nil {
				t.Fatalf("dialing %s: %v", dial, err)
			}
			if res := <-ping.Ping(ctx, d, h.ID()); res.Error != nil {
				t.Fatalf("ping over %s: %v", dial, res.Error)
			}
			dialAndPing(t, f, h.ID(), forgeAddr)
		})
	}
}
