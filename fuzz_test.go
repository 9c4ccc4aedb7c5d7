package autotls

// Fuzz targets of the parsers that read what others send or store: broker
// responses, stored certificates and accounts, endpoints, forge addresses.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	ma "github.com/multiformats/go-multiaddr"
)

// FuzzBrokerResponse: whatever a broker (or anything in front of it)
// answers, the client returns nil only for the expected status, and
// otherwise a BrokerError whose body excerpt is bounded, valid UTF-8,
// free of control characters and of the access token, whose Retry-After
// is within [0, 7 days], and whose text is one line.
func FuzzBrokerResponse(f *testing.F) {
	f.Add(204, "", []byte(nil), false)
	f.Add(429, "120", []byte("slow down"), false)
	f.Add(503, "Wed, 21 Oct 2015 07:28:00 GMT", []byte("<html>maintenance</html>"), false)
	f.Add(400, "", []byte("error testing addresses: failed to dial: no addresses"), false)
	f.Add(403, "", []byte("403 Forbidden: "+testAccessToken), false)
	f.Add(500, "99999999999999999999", []byte("\x1b[31m\x00\xff\xfe\nline two"), true)
	f.Add(200, "-1", bytes.Repeat([]byte("é"), 600), false)
	f.Fuzz(func(t *testing.T, status int, retryAfter string, body []byte, readErr bool) {
		if status < 100 || status > 999 {
			return
		}
		c := &brokerClient{accessToken: testAccessToken, now: func() time.Time { return time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC) }}
		resp := &http.Response{StatusCode: status, Header: http.Header{}, Body: io.NopCloser(bytes.NewReader(body))}
		if readErr {
			resp.Body = io.NopCloser(io.MultiReader(bytes.NewReader(body), iotestErrReader{}))
		}
		resp.Header.Set("Retry-After", retryAfter)
		err := c.check("register", resp, nil, http.StatusOK)
		if status == http.StatusOK {
			if err != nil {
				t.Fatalf("status 200: %v", err)
			}
			return
		}
		var be *BrokerError
		if !errors.As(err, &be) {
			t.Fatalf("status %d: %v is not a BrokerError", status, err)
		}
		if len(be.Body) > maxErrorBody || !utf8.ValidString(be.Body) || strings.ContainsFunc(be.Body, unicode.IsControl) {
			t.Fatalf("body excerpt %q", be.Body)
		}
		if be.RetryAfter < 0 || be.RetryAfter > maxRetryAfter {
			t.Fatalf("Retry-After %q gave %v", retryAfter, be.RetryAfter)
		}
		if text := be.Error(); strings.Contains(text, testAccessToken) || strings.ContainsAny(text, "\n\r") {
			t.Fatalf("error text %q", text)
		}
		_ = be.Temporary()
		_ = be.Unreachable()
		_ = be.LogValue()
	})
}

type iotestErrReader struct{}

func (iotestErrReader) Read([]byte) (int, error) { return 0, errors.New("connection reset") }

// FuzzCheckCert: any bytes in storage as certificate and key give an error
// or a certificate for exactly our name, with its key, valid now; never a
// panic.
func FuzzCheckCert(f *testing.F) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		f.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	const name = "*.k51qzi5uqu5dj6ft7ppq8ysnv4c2s8t3bwrcxzwa6fjh9cluo9bsxrsgbs1rmd.libp2p.direct"
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), DNSNames: []string{name}, NotBefore: time.Unix(0, 0), NotAfter: time.Unix(1<<33, 0)}
	certDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		f.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER})
	f.Add(certPEM, keyPEM)
	f.Add(certPEM[:len(certPEM)/2], keyPEM)
	f.Add(keyPEM, certPEM)
	f.Add([]byte{}, []byte{})
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, certPEM, keyPEM []byte) {
		c, err := checkCert(certPEM, keyPEM, name, now)
		if err != nil {
			return
		}
		if len(c.leaf.DNSNames) != 1 || !strings.EqualFold(c.leaf.DNSNames[0], name) || now.After(c.leaf.NotAfter) {
			t.Fatalf("accepted a certificate for %v valid until %v", c.leaf.DNSNames, c.leaf.NotAfter)
		}
	})
}

// FuzzParseStoredAccount: a stored ACME account, whatever its bytes, loads
// as a usable account or gives an error.
func FuzzParseStoredAccount(f *testing.F) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		f.Fatal(err)
	}
	good, err := json.Marshal(storedAccount{Location: "https://ca.example/acct/1", PrivateKeyPEM: string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))})
	if err != nil {
		f.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 1024)
	if err == nil {
		if d, err := x509.MarshalPKCS8PrivateKey(rsaKey); err == nil {
			b, _ := json.Marshal(storedAccount{Location: "x", PrivateKeyPEM: string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: d}))})
			f.Add(b)
		}
	}
	f.Add(good)
	f.Add([]byte(`{"location":"x","private_key_pem":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"}`))
	f.Add([]byte(`null`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, raw []byte) {
		acct, err := parseStoredAccount(raw)
		if err != nil {
			return
		}
		if acct.Location == "" || acct.PrivateKey == nil {
			t.Fatalf("accepted an account without location or key: %+v", acct)
		}
	})
}

// FuzzParseEndpoint: a broker endpoint is accepted only as an absolute
// http(s) URL with a host and nothing the client would silently drop, and
// what is returned is stable.
func FuzzParseEndpoint(f *testing.F) {
	for _, s := range []string{
		"https://registration.libp2p.direct", "http://127.0.0.1:8080/", "https://user:pw@host", "https://host/?q",
		"https://host/#f", "ftp://host", "//host", "https://", "https://host/base//", "", "http://[::1]:1/x",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, endpoint string) {
		base, err := parseEndpoint(endpoint)
		if err != nil {
			return
		}
		u, err := url.Parse(base)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || strings.HasSuffix(base, "/") {
			t.Fatalf("parseEndpoint(%q) = %q", endpoint, base)
		}
		if again, err := parseEndpoint(base); err != nil || again != base {
			t.Fatalf("parseEndpoint is not stable on %q: %q, %v", base, again, err)
		}
	})
}

// FuzzForgeAddr: the browser address built from any listen address is
// either refused or parses back to that listener's IP and port and our
// PeerID, in both forms.
func FuzzForgeAddr(f *testing.F) {
	id := vectorID(f)
	for _, s := range []string{
		"/ip4/203.0.113.7/tcp/4001/tls/sni/*.libp2p.direct/ws",
		"/ip6/2001:db8::1/tcp/443/tls/sni/*.libp2p.direct/ws",
		"/ip4/1.2.3.4/tcp/1/tls/sni/*.other.example/ws",
		"/ip4/1.2.3.4/tcp/1/ws",
		"/ip6/::ffff:1.2.3.4/tcp/1/tls/sni/*.libp2p.direct/ws",
		"/dns4/example.com/tcp/1/tls/sni/*.libp2p.direct/ws",
	} {
		f.Add(ma.StringCast(s).Bytes(), false)
		f.Add(ma.StringCast(s).Bytes(), true)
	}
	f.Fuzz(func(t *testing.T, b []byte, short bool) {
		a, err := ma.NewMultiaddrBytes(b)
		if err != nil {
			return
		}
		_ = isForgeListenAddr(a, testForge)
		_, _ = wssListenAddr(a, testForge)
		fa, ok := forgeAddr(a, id, testForge, short)
		if !ok {
			return
		}
		ip, port, gotID, err := parseForgeAddr(fa, testForge)
		if err != nil || gotID != id {
			t.Fatalf("forgeAddr(%s) = %s, which parses as %v, %v, %v: %v", a, fa, ip, port, gotID, err)
		}
		if tw := thinWaist(a); tw == nil || !strings.Contains(tw.String(), "/tcp/"+strconv.Itoa(int(port))) {
			t.Fatalf("forgeAddr(%s) = %s names port %d", a, fa, port)
		}
	})
}
