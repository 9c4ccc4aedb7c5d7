package autotls

// Security properties of design.md ("What must hold"), each proven against
// the real components where they can run: the identity key never leaves
// the process, PeerID-auth signatures are bound to the broker's hostname,
// private addresses are not sent unless allowed, a certificate is checked
// before it is served, keys are written 0600 in 0700 directories, the
// access token is never logged, TLS is 1.2 at least; and fuzz tests for
// the parsers that had none (broker responses, stored certificates and
// ACME accounts, the broker endpoint, forge addresses built from listen
// addresses).

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httputil"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/mholt/acmez/v3/acme"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// privateForms returns the secret material of key in every form it could
// leak as: libp2p's raw and protobuf encodings, and the bare private
// scalar or exponent, each raw, in hex and in base64 (see encodedForms).
func privateForms(t *testing.T, key crypto.PrivKey) map[string][]byte {
	t.Helper()
	raw, err := key.Raw()
	if err != nil {
		t.Fatal(err)
	}
	marshalled, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{"raw key": raw, "protobuf key": marshalled}
	switch key.Type() {
	case crypto.Ed25519:
		out["seed"] = raw[:32]
	case crypto.ECDSA:
		k, err := x509.ParseECPrivateKey(raw)
		if err != nil {
			t.Fatal(err)
		}
		scalar, err := k.Bytes()
		if err != nil {
			t.Fatal(err)
		}
		out["scalar"] = scalar
	case crypto.RSA:
		k, err := x509.ParsePKCS1PrivateKey(raw)
		if err != nil {
			t.Fatal(err)
		}
		out["private exponent"] = k.D.Bytes()
		out["prime"] = k.Primes[0].Bytes()
	}
	return out
}

// TestSecurityIdentityKeyNeverSent: a full issuance for each key type, with
// everything the broker and the CA receive captured (every request, headers
// and body) and the storage read back: none contains the identity key in
// any encoding. The broker does see the public key, which shows the capture
// is not vacuous.
func TestSecurityIdentityKeyNeverSent(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	for _, tc := range []struct {
		name string
		typ  int
	}{
		{"ed25519", crypto.Ed25519},
		{"secp256k1", crypto.Secp256k1},
		{"ecdsa", crypto.ECDSA},
		{"rsa", crypto.RSA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var seen [][]byte
			f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
				dump, err := httputil.DumpRequest(r, true) // restores the body
				if err != nil {
					t.Error(err)
				}
				mu.Lock()
				seen = append(seen, dump)
				mu.Unlock()
				return false
			})
			defer f.SetBrokerFault(nil)
			caBefore := len(ca.Requests())
			key := genKey(t, tc.typ)
			st := storage.Memory()
			h := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, WithStorage(st), WithCA(ca.URL, ca.Roots))
			waitCert(t, h, 30*time.Second)
			if err := h.Close(); err != nil {
				t.Fatal(err)
			}

			mu.Lock()
			broker := bytes.Join(seen, []byte("\n"))
			mu.Unlock()
			var caBodies [][]byte
			for _, q := range ca.Requests()[caBefore:] {
				caBodies = append(caBodies, []byte(q.Method+" "+q.Path), q.Body)
			}
			var stored [][]byte
			keys, err := st.List(t.Context(), "", true)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range keys {
				if v, err := st.Load(t.Context(), k); err == nil {
					stored = append(stored, v)
				}
			}
			places := map[string][]byte{
				"the broker":  broker,
				"the CA":      bytes.Join(caBodies, []byte("\n")),
				"the storage": bytes.Join(stored, []byte("\n")),
			}
			for what, secret := range privateForms(t, key) {
				for _, form := range encodedForms(secret) {
					for where, got := range places {
						if bytes.Contains(got, []byte(form)) {
							t.Errorf("the %s of the identity key reached %s (as %q)", what, where, form)
						}
					}
				}
			}
			pub, err := crypto.MarshalPublicKey(key.GetPublic())
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(broker, []byte(base64.URLEncoding.EncodeToString(pub))) {
				t.Error("the public key is not in the captured broker traffic: the capture is broken")
			}
			if len(caBodies) == 0 || len(stored) == 0 {
				t.Error("nothing captured at the CA or in storage")
			}
		})
	}
}

// authRecorder records the client's side of the broker's HTTP traffic:
// each request's Authorization and each response's WWW-Authenticate.
type authRecorder struct {
	next          http.RoundTripper
	mu            sync.Mutex
	authorization []string
	challenge     []string
}

func (a *authRecorder) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := a.next.RoundTrip(r)
	a.mu.Lock()
	defer a.mu.Unlock()
	if v := r.Header.Get("Authorization"); v != "" {
		a.authorization = append(a.authorization, v)
	}
	if resp != nil {
		if v := resp.Header.Get("WWW-Authenticate"); v != "" {
			a.challenge = append(a.challenge, v)
		}
	}
	return resp, err
}

// TestSecurityHostnameBinding: in a real issuance, the signature the host
// sends the broker verifies over the broker's own host name (host:port
// here) and over no other: replayed to another server, or relayed by one
// under another name, it is worthless.
func TestSecurityHostnameBinding(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	tr := http.DefaultTransport.(*http.Transport).Clone()
	defer tr.CloseIdleConnections()
	rec := &authRecorder{next: tr}
	key := genKey(t, crypto.Ed25519)
	h := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, WithStorage(storage.Memory()),
		WithHTTPClient(&http.Client{Transport: rec, Timeout: time.Minute}))
	waitCert(t, h, 30*time.Second)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}

	rec.mu.Lock()
	defer rec.mu.Unlock()
	var signed map[string]string
	for _, a := range rec.authorization {
		if p := authParams(t, a); p["sig"] != "" && p["opaque"] != "" {
			signed = p
		}
	}
	if signed == nil || len(rec.challenge) == 0 {
		t.Fatalf("no signed handshake leg captured: %q, %q", rec.authorization, rec.challenge)
	}
	server := authParams(t, rec.challenge[len(rec.challenge)-1])
	serverKey, err := base64.URLEncoding.DecodeString(server["public-key"])
	if err != nil {
		t.Fatal(err)
	}
	sig, err := base64.URLEncoding.DecodeString(signed["sig"])
	if err != nil {
		t.Fatal(err)
	}
	brokerHost := strings.TrimPrefix(f.BrokerURL, "http://")
	verify := func(hostname string) bool {
		data := authSignedData(map[string][]byte{
			"challenge-client":  []byte(server["challenge-client"]),
			"hostname":          []byte(hostname),
			"server-public-key": serverKey,
		})
		ok, err := key.GetPublic().Verify(data, sig)
		return err == nil && ok
	}
	if !verify(brokerHost) {
		t.Fatalf("the signature does not verify over the broker's host name %q", brokerHost)
	}
	for _, other := range []string{"localhost" + strings.TrimPrefix(brokerHost, "127.0.0.1"), "registration.libp2p.direct", "evil.example", ""} {
		if verify(other) {
			t.Errorf("the signature also verifies for host name %q", other)
		}
	}
}

// TestSecurityPrivateAddrsNotSent: of a host's addresses (loopback,
// RFC 1918, CGNAT, link-local, NAT64, relayed, a forge listener and public
// ones), only the public, direct, plain TCP ones are offered to the broker for its
// dial-back (any TCP ones with WithAllowPrivateAddrs); with none public, nothing is
// sent at all. Checked on brokerAddrs and on what the broker receives from
// the solver's Present.
func TestSecurityPrivateAddrsNotSent(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	relayed := ma.StringCast("/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWGC6TvWhfapngNXBzfEYJuztp2ZtnV9Y5NhsjxPb5a7w2/p2p-circuit")
	private := []string{
		"/ip4/127.0.0.1/tcp/4001",
		"/ip4/10.1.2.3/tcp/4001",
		"/ip4/192.168.1.20/tcp/4001",
		"/ip4/172.16.0.5/udp/4001/quic-v1",
		"/ip4/100.64.0.9/tcp/4001",
		"/ip6/::1/tcp/4001",
		"/ip6/fe80::1/tcp/4001",
		"/ip6/fd00::1/tcp/4001",
		"/ip6/64:ff9b::102:304/tcp/4001",
		"/ip4/127.0.0.1/tcp/4001/tls/sni/*." + f.Domain + "/ws",
	}
	public := []string{"/ip4/1.2.3.4/tcp/4001", "/ip4/1.2.3.4/udp/4001/quic-v1", "/ip6/2606:4700::1/tcp/4001"}
	// Only plain TCP addresses go to the broker: a dial-back over QUIC
	// would prove nothing about the TCP port a browser dials.
	publicTCP := []string{"/ip4/1.2.3.4/tcp/4001", "/ip6/2606:4700::1/tcp/4001"}
	var privateTCP []string
	for _, s := range private {
		if isThinTCP(ma.StringCast(s)) {
			privateTCP = append(privateTCP, s)
		}
	}
	factory := func(withPublic bool) func([]ma.Multiaddr) []ma.Multiaddr {
		return func([]ma.Multiaddr) []ma.Multiaddr {
			var out []ma.Multiaddr
			for _, s := range private {
				out = append(out, ma.StringCast(s))
			}
			out = append(out, relayed)
			if withPublic {
				for _, s := range public {
					out = append(out, ma.StringCast(s))
				}
			}
			return out
		}
	}
	// host builds a host with the given addresses; without allowPrivate it
	// waits at the reachability gate for ever, which leaves the manager
	// idle while the test calls its solver.
	host := func(t *testing.T, withPublic, allowPrivate bool) *manager {
		var m *manager
		opts := []Opt{
			WithForgeDomain(f.Domain), WithRegistrationEndpoint(f.BrokerURL), WithCA(f.CAURL, f.CARoots),
			WithResolver(f.Resolver()), WithStorage(storage.Memory()), WithLogger(slog.New(slog.DiscardHandler)),
			withManager(func(x *manager) { m = x }),
		}
		if allowPrivate {
			// The gate is skipped: hold the manager back with a broker
			// that says it is down until the test is done.
			opts = append(opts, WithAllowPrivateAddrs(), withClock(newClockAtNowParked()))
		}
		h, err := libp2p.New(append(f.HostOptions(), libp2p.AddrsFactory(factory(withPublic)), Option(opts...))...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = h.Close() })
		return m
	}
	var mu sync.Mutex
	var bodies []registerRequest
	f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == healthPath {
			http.Error(w, "held back by the test", http.StatusServiceUnavailable)
			return true
		}
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		var reg registerRequest
		if len(body) > 0 && json.Unmarshal(body, &reg) == nil {
			mu.Lock()
			bodies = append(bodies, reg)
			mu.Unlock()
		}
		return false
	})
	defer f.SetBrokerFault(nil)
	chal := acme.Challenge{Type: acme.ChallengeTypeDNS01, Token: "dGVzdC10b2tlbg", KeyAuthorization: "dGVzdC10b2tlbg.dGh1bWJwcmludA"}

	for _, tc := range []struct {
		name                     string
		withPublic, allowPrivate bool
		want                     []string // nil: nothing sent
	}{
		{"public and private", true, false, publicTCP},
		{"private only", false, false, nil},
		{"private allowed", true, true, append(privateTCP, publicTCP...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := host(t, tc.withPublic, tc.allowPrivate)
			got, err := m.brokerAddrs()
			if tc.want == nil {
				if err == nil {
					t.Fatalf("brokerAddrs = %v, want an error", got)
				}
			} else if err != nil || !sameAddrs(got, tc.want) {
				t.Fatalf("brokerAddrs = %v, %v; want %v", got, err, tc.want)
			}

			mu.Lock()
			bodies = nil
			mu.Unlock()
			before := f.Stats().Challenge
			err = m.issuer.solver.Present(t.Context(), chal)
			mu.Lock()
			defer mu.Unlock()
			if tc.want == nil {
				if err == nil || f.Stats().Challenge != before {
					t.Fatalf("Present sent %d requests (err %v) for a host with no public address", f.Stats().Challenge-before, err)
				}
				return
			}
			// The dial-back to documentation and public addresses fails
			// (the forge dials loopback only): only the body matters.
			if len(bodies) != 1 {
				t.Fatalf("the broker received %d registrations, want 1 (err %v)", len(bodies), err)
			}
			if !sameStrings(bodies[0].Addresses, tc.want) {
				t.Errorf("the broker received addresses %v, want %v", bodies[0].Addresses, tc.want)
			}
		})
	}
}

// newClockAtNowParked is a fake clock whose every wait parks: the manager
// never gets past its first wait.
func newClockAtNowParked() *fakeClock {
	c := newClockAtNow()
	c.SetHorizon(c.Now())
	return c
}

func sameAddrs(got []ma.Multiaddr, want []string) bool {
	s := make([]string, len(got))
	for i, a := range got {
		s[i] = a.String()
	}
	return sameStrings(s, want)
}

func sameStrings(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// TestSecurityCheckCert: checkCert, which every certificate passes before
// it is served (from storage at start, and after each issuance), accepts
// exactly a certificate for our wildcard name, with its own key, valid
// now; real Pebble certificates are used for the cases a CA could produce.
func TestSecurityCheckCert(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	mine, other := genKey(t, crypto.Ed25519), genKey(t, crypto.Ed25519)
	myID, otherID := idOf(t, mine), idOf(t, other)
	certKey, otherKey := ecdsaKey(t), ecdsaKey(t)
	issue := func(id peer.ID, k *ecdsa.PrivateKey) []byte {
		chains, err := f.IssueDirect(t.Context(), id, k)
		if err != nil {
			t.Fatal(err)
		}
		return chains[0].ChainPEM
	}
	good, foreign := issue(myID, certKey), issue(otherID, otherKey)
	leaf, err := tls.X509KeyPair(good, pemKey(t, certKey))
	if err != nil {
		t.Fatal(err)
	}
	name := certName(myID, f.Domain)
	// A self-signed certificate naming ours and another name too.
	extra := selfSigned(t, certKey, []string{name, "*.example.com"})
	upper := selfSigned(t, certKey, []string{strings.ToUpper(name)})

	for _, tc := range []struct {
		name      string
		cert, key []byte
		now       time.Time
		ok        bool
	}{
		{"ours", good, pemKey(t, certKey), time.Now(), true},
		{"ours, names in upper case", upper, pemKey(t, certKey), time.Now(), true},
		{"another peer's", foreign, pemKey(t, otherKey), time.Now(), false},
		{"ours with another key", good, pemKey(t, otherKey), time.Now(), false},
		{"another name besides ours", extra, pemKey(t, certKey), time.Now(), false},
		{"expired", good, pemKey(t, certKey), leaf.Leaf.NotAfter.Add(time.Second), false},
		{"not yet valid", good, pemKey(t, certKey), leaf.Leaf.NotBefore.Add(-2 * time.Hour), false},
		{"no certificate", nil, pemKey(t, certKey), time.Now(), false},
		{"no key", good, nil, time.Now(), false},
		{"garbage", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), pemKey(t, certKey), time.Now(), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := checkCert(tc.cert, tc.key, name, tc.now)
			if (err == nil) != tc.ok {
				t.Fatalf("checkCert: %v, want ok %v", err, tc.ok)
			}
			if tc.ok && (c == nil || c.leaf == nil || c.tls.Leaf != c.leaf) {
				t.Fatalf("checkCert returned %+v", c)
			}
		})
	}
}

func selfSigned(t *testing.T, k *ecdsa.PrivateKey, names []string) []byte {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: names[0]},
		DNSNames:     names,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// TestSecurityTLSMinVersion: the WSS listener refuses clients that offer
// only TLS 1.0 or 1.1, and serves TLS 1.2 and 1.3.
func TestSecurityTLSMinVersion(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	h := newHost(t, f, nil, WithStorage(storage.Memory()))
	waitCert(t, h, 30*time.Second)
	addr := waitBrowserAddr(t, h, f.Domain, "/ip4/127.0.0.1/")
	sni := "127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + f.Domain
	for _, tc := range []struct {
		name    string
		version uint16
		ok      bool
	}{
		{"TLS 1.0", tls.VersionTLS10, false},
		{"TLS 1.1", tls.VersionTLS11, false},
		{"TLS 1.2", tls.VersionTLS12, true},
		{"TLS 1.3", tls.VersionTLS13, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &tls.Dialer{Config: &tls.Config{ServerName: sni, RootCAs: f.IssuerRoots, MinVersion: tc.version, MaxVersion: tc.version}}
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			conn, err := d.DialContext(ctx, "tcp", tcpHostPort(t, addr))
			if err == nil {
				defer conn.Close()
			}
			if (err == nil) != tc.ok {
				t.Fatalf("handshake offering only %s: %v, want success %v", tc.name, err, tc.ok)
			}
			// Refused by the server, not by our own client.
			if !tc.ok && !strings.Contains(err.Error(), "remote error: tls: protocol version not supported") {
				t.Fatalf("handshake offering only %s failed, but not on the server's refusal: %v", tc.name, err)
			}
			if tc.ok {
				if v := conn.(*tls.Conn).ConnectionState().Version; v != tc.version {
					t.Fatalf("negotiated %x, want %x", v, tc.version)
				}
			}
		})
	}
}
