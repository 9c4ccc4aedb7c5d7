package browsertest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/transport/websocket"
	"github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/multiformats/go-multibase"
)

const forge = "test.forge"

// TestDial has the browser dial a go-libp2p host serving Secure WebSockets
// with a certificate for *.<b36peerid>.test.forge from a private CA, as an
// autotls host does, in both address forms, trusting the CA and not.
func TestDial(t *testing.T) {
	Require(t)
	ca := newTestCA(t)
	h, port := newWSSHost(t, ca)
	name := "127-0-0-1." + b36(t, h.ID()) + "." + forge
	long := fmt.Sprintf("/ip4/127.0.0.1/tcp/%d/tls/sni/%s/ws/p2p/%s", port, name, h.ID())
	short := fmt.Sprintf("/dns4/%s/tcp/%d/tls/ws/p2p/%s", name, port, h.ID())

	for _, tc := range []struct {
		name    string
		ma      string
		trust   []byte
		wantErr string // "" wants OK; else a part of Result.Error
	}{
		{"long form", long, ca.rootPEM, ""},
		{"short form", short, ca.rootPEM, ""},
		{"root not trusted", long, nil, "ERR_CERT_AUTHORITY_INVALID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			res, err := Dial(t.Context(), Options{
				Multiaddr:    tc.ma,
				TrustRootPEM: tc.trust,
				HostRules:    "MAP *." + forge + " 127.0.0.1",
				Timeout:      30 * time.Second,
			})
			t.Logf("chromium start → report: %v; %+v", time.Since(start).Round(time.Millisecond), res)
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantErr != "" {
				if res.OK || !strings.Contains(res.Error, tc.wantErr) {
					t.Fatalf("got %+v, want a failure with %q", res, tc.wantErr)
				}
				return
			}
			if !res.OK {
				t.Fatalf("dial failed: %s", res.Error)
			}
			if res.RemotePeer != h.ID().String() {
				t.Errorf("RemotePeer = %q, want %q", res.RemotePeer, h.ID())
			}
			if len(res.RTTs) == 0 {
				t.Error("no ping RTTs")
			}
		})
	}
}

// TestDialNothingListening checks that a refused connection is reported as
// a failure and that Dial leaves no goroutine, process or directory behind.
func TestDialNothingListening(t *testing.T) {
	Require(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()

	// Dial's temporary directory, and so Chromium's, go under tmp (not
	// t.TempDir, too long a path for Dial to use).
	tmp, err := os.MkdirTemp("", "bt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	t.Setenv("TMPDIR", tmp)
	goroutines := runtime.NumGoroutine()
	res, err := Dial(t.Context(), Options{
		Multiaddr: fmt.Sprintf("/dns4/127-0-0-1.x.%s/tcp/%d/tls/ws", forge, port),
		HostRules: "MAP *." + forge + " 127.0.0.1",
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.OK || res.Error == "" {
		t.Errorf("got %+v, want a failure with an error", res)
	}
	if p := leftoverProcesses(t, tmp); len(p) > 0 {
		t.Errorf("chromium processes left running: %v", p)
	}
	if left, _ := os.ReadDir(tmp); len(left) > 0 {
		t.Errorf("left in the temporary directory: %v", left)
	}
	// The page server's and Chromium's goroutines end with Dial; allow a
	// moment for the runtime to retire them.
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > goroutines && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > goroutines {
		t.Errorf("%d goroutines before Dial, %d after", goroutines, n)
	}
}

// TestResolverRules pins the hermetic --host-resolver-rules value.
func TestResolverRules(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"},
		{"MAP *.test.forge 127.0.0.1", "MAP *.test.forge 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"},
	} {
		if got := resolverRules(tc.in); got != tc.want {
			t.Errorf("resolverRules(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestTLSFailures(t *testing.T) {
	for _, tc := range []struct{ name, log, want string }{
		{"none", "[1:2:1123/122519.523107:INFO:CONSOLE:25] \"hello\"\n", ""},
		{"known", "[29458:29569:1123/122519.961254:ERROR:net/socket/ssl_client_socket_impl.cc:949] handshake failed; returned -1, SSL error code 1, net_error -202\n",
			"chromium: TLS handshake failed: net error -202 ERR_CERT_AUTHORITY_INVALID"},
		{"unknown, twice", "handshake failed; returned -1, SSL error code 1, net_error -999\nhandshake failed; returned -1, SSL error code 1, net_error -999\n",
			"chromium: TLS handshake failed: net error -999"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tlsFailures(tc.log); got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestTailBuffer(t *testing.T) {
	b := &tailBuffer{max: 4}
	b.Write([]byte("ab"))
	if got := b.String(); got != "ab" {
		t.Errorf("got %q", got)
	}
	b.Write([]byte("cdef"))
	if got := b.String(); got != "[…]cdef" {
		t.Errorf("got %q", got)
	}
}

// testCA is a throwaway CA root and the means to issue leaves under it.
type testCA struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	rootPEM []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "browsertest root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue returns a leaf for dnsNames signed by the CA, with the chain.
func (ca *testCA) issue(t *testing.T, dnsNames ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: dnsNames[0]},
		DNSNames:     dnsNames,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.cert.Raw}, PrivateKey: key}
}

// b36 is the PeerID as the base36 CIDv1 label used in forge names.
func b36(t *testing.T, id peer.ID) string {
	t.Helper()
	s, err := peer.ToCid(id).StringOfBase(multibase.Base36)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// newWSSHost starts a go-libp2p host serving Secure WebSockets on
// 127.0.0.1 with a certificate for *.<b36peerid>.test.forge, and returns it
// with its port.
func newWSSHost(t *testing.T, ca *testCA) (host.Host, int) {
	t.Helper()
	// The certificate names the PeerID, so the identity comes first.
	id, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := peer.IDFromPrivateKey(id)
	if err != nil {
		t.Fatal(err)
	}
	leaf := ca.issue(t, "*."+b36(t, pid)+"."+forge)
	h, err := libp2p.New(
		libp2p.Identity(id),
		libp2p.Transport(websocket.New, websocket.WithTLSConfig(&tls.Config{Certificates: []tls.Certificate{leaf}})),
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0/tls/sni/*."+forge+"/ws"),
		libp2p.ConnectionGater(loopbackOnly{}),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	for _, a := range h.Network().ListenAddresses() {
		if port, err := a.ValueForProtocol(multiaddr.P_TCP); err == nil {
			var p int
			if _, err := fmt.Sscan(port, &p); err == nil && p != 0 {
				return h, p
			}
		}
	}
	t.Fatalf("no TCP port among the listen addresses %v", h.Network().ListenAddresses())
	return nil, 0
}

// loopbackOnly is a connection gater that refuses every non-loopback
// address, so that nothing in a test leaves the machine.
type loopbackOnly struct{}

func (loopbackOnly) InterceptPeerDial(peer.ID) bool { return true }
func (loopbackOnly) InterceptAddrDial(_ peer.ID, a multiaddr.Multiaddr) bool {
	return manet.IsIPLoopback(a)
}
func (loopbackOnly) InterceptAccept(c network.ConnMultiaddrs) bool {
	return manet.IsIPLoopback(c.RemoteMultiaddr())
}
func (loopbackOnly) InterceptSecured(_ network.Direction, _ peer.ID, c network.ConnMultiaddrs) bool {
	return manet.IsIPLoopback(c.RemoteMultiaddr())
}
func (loopbackOnly) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) {
	return true, 0
}

// leftoverProcesses lists the processes with an argument containing s,
// zombies included.
func leftoverProcesses(t *testing.T, s string) []string {
	t.Helper()
	var found []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), s) {
			found = append(found, strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	return found
}

// TestTempBaseTooLong checks that a long TMPDIR, where Chromium could not
// make its sockets, is not used.
func TestTempBaseTooLong(t *testing.T) {
	long := filepath.Join(t.TempDir(), strings.Repeat("x", 40))
	t.Setenv("TMPDIR", long)
	if got := tempBase(); got != "/tmp" {
		t.Errorf("tempBase() = %q with TMPDIR=%q, want /tmp", got, long)
	}
	t.Setenv("TMPDIR", "/var/tmp")
	if got := tempBase(); got != "/var/tmp" {
		t.Errorf("tempBase() = %q with TMPDIR=/var/tmp", got)
	}
}
