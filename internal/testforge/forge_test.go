package testforge

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"net/http"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/mholt/acmez/v3/acme"
)

// issue runs IssueDirect for id and returns the parsed chain, leaf first.
func issue(t *testing.T, f *Forge, id peer.ID) []*x509.Certificate {
	t.Helper()
	certKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chains, err := f.IssueDirect(t.Context(), id, certKey)
	if err != nil {
		t.Fatalf("IssueDirect: %v", err)
	}
	return parseChain(t, chains[0])
}

func parseChain(t *testing.T, c acme.Certificate) []*x509.Certificate {
	t.Helper()
	var certs []*x509.Certificate
	rest := c.ChainPEM
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		t.Fatal("no certificate in chain")
	}
	return certs
}

// verifyLeaf checks the leaf covers dnsName and chains to the issuing root.
func verifyLeaf(t *testing.T, f *Forge, chain []*x509.Certificate, dnsName string) {
	t.Helper()
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		DNSName:       dnsName,
		Roots:         f.IssuerRoots,
		Intermediates: inter,
	})
	if err != nil {
		t.Fatalf("leaf does not verify for %s: %v", dnsName, err)
	}
}

func TestIssueDirect(t *testing.T) {
	f := startForge(t, Config{CertValidity: time.Hour})
	_, id := seededKey(t, 2)
	chain := issue(t, f, id)
	leaf := chain[0]

	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != f.CertName(id) {
		t.Fatalf("leaf names = %v, want [%s]", leaf.DNSNames, f.CertName(id))
	}
	verifyLeaf(t, f, chain, "1-2-3-4."+PeerLabel(id)+"."+f.Domain)
	// Pebble's NotAfter is NotBefore + validity - 1s.
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got != time.Hour-time.Second {
		t.Errorf("leaf validity = %v, want %v", got, time.Hour-time.Second)
	}
	// The issuing root PEM is the same root.
	block, _ := pem.Decode(f.IssuerRootPEM)
	if block == nil {
		t.Fatal("IssuerRootPEM holds no PEM block")
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(f.IssuerRootPEM)
	if !pool.Equal(f.IssuerRoots) {
		t.Error("IssuerRootPEM and IssuerRoots differ")
	}
	st := f.Stats()
	if st.CA == 0 || st.DNSTXT == 0 {
		t.Errorf("Stats = %+v, want CA requests and TXT queries (the VA's)", st)
	}
	if st.Challenge != 0 || st.Registered != 0 {
		t.Errorf("Stats = %+v, want no broker traffic", st)
	}
}

// A fresh order always needs a fresh DNS-01 (no authz reuse by default): a
// second issuance for the same peer queries the TXT record again.
func TestNoAuthzReuse(t *testing.T) {
	f := startForge(t, Config{})
	_, id := seededKey(t, 2)
	issue(t, f, id)
	first := f.Stats().DNSTXT
	issue(t, f, id)
	if f.Stats().DNSTXT == first {
		t.Fatal("second order was validated without a DNS lookup")
	}
}

func TestCAClientTrustsOnlyCARoots(t *testing.T) {
	f := startForge(t, Config{})
	resp, err := f.CAClient().Get(f.CAURL)
	if err != nil {
		t.Fatalf("GET directory: %v", err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET directory = %d", resp.StatusCode)
	}
	if _, err := http.Get(f.CAURL); err == nil {
		t.Fatal("the system roots trusted the CA endpoint")
	}
}

// Pebble reads its settings from the environment at construction: Start
// must restore it, and forges with different settings may start in parallel.
// Start rather than New: the forges start on goroutines of their own, where
// New could not fail the test.
func TestPebbleEnvRestoredAndParallel(t *testing.T) {
	const v = "PEBBLE_WFE_NONCEREJECT"
	t.Setenv(v, "sentinel") // also makes the test non-parallel, as it must be
	var wg sync.WaitGroup
	for i, pct := range []int{0, 20, 0, 20} {
		wg.Go(func() {
			f, err := Start(Config{NonceRejectPercent: pct})
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			_, id := seededKey(t, byte(10+i))
			certKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if _, err := f.IssueDirect(t.Context(), id, certKey); err != nil {
				t.Errorf("IssueDirect with %d%% nonce rejection: %v", pct, err)
			}
		})
	}
	wg.Wait()
	if got := os.Getenv(v); got != "sentinel" {
		t.Fatalf("%s = %q after Start, want it restored", v, got)
	}
}

// New closes the forge when the test that started it ends: nothing
// answers on its addresses afterwards.
func TestNewClosesWithTest(t *testing.T) {
	var f *Forge
	t.Run("forge", func(t *testing.T) {
		f = New(t, Config{})
		_, id := seededKey(t, 2)
		if _, err := f.Resolver().LookupIPAddr(t.Context(), "127-0-0-1."+PeerLabel(id)+"."+f.Domain); err != nil {
			t.Fatalf("the running forge's DNS: %v", err)
		}
	})
	if t.Failed() {
		return
	}
	for _, u := range []string{f.BrokerURL, f.CAURL} {
		req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, u, nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp, err := f.CAClient().Do(req); err == nil {
			resp.Body.Close()
			t.Errorf("%s answered %s after the test that started the forge ended", u, resp.Status)
		}
	}
	if err := f.Close(); err != nil {
		t.Errorf("Close after New's cleanup: %v", err)
	}
}

func TestStartCloseNoLeak(t *testing.T) {
	// Warm up: packages start lazy, process-wide goroutines on first use.
	cycle(t)
	before := runtime.NumGoroutine()

	for range 3 {
		cycle(t)
	}
	waitGoroutines(t, before)
}

// cycle starts a forge, registers through the broker from a real host,
// issues a certificate, and closes everything, timing the start and Close.
// Close is called here, before the test's cleanup closes the forge again,
// so that the leak check sees it closed.
func cycle(t *testing.T) {
	t.Helper()
	start := time.Now()
	f := New(t, Config{})
	started := time.Since(start)

	key, id := seededKey(t, 2)
	h := newHostNoCleanup(t, f, key)
	c := newClient(f, key)
	if r := c.do(t, http.MethodPost, registrationBody(t, digest("leak"), h), nil); r.status != http.StatusOK {
		t.Fatalf("registration = %d %q", r.status, r.body)
	}
	c.http.CloseIdleConnections()
	_ = h.Close()

	t0 := time.Now()
	issue(t, f, id)
	issued := time.Since(t0)

	t0 = time.Now()
	if err := f.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	t.Logf("New %v, IssueDirect %v, Close %v", started, issued, time.Since(t0))
}
