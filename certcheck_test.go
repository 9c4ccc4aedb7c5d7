package autotls

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"
)

// The name and the time the test certificates are issued for.
const testCertName = "*.k51test.example"

var testCertNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// testPKI is a root CA, an intermediate it signed, and a leaf for
// testCertName the intermediate signed, all with ECDSA P-256 keys, valid
// around testCertNow.
type testPKI struct {
	rootKey, interKey, leafKey *ecdsa.PrivateKey
	root, inter, leaf          *x509.Certificate
	serial                     int64
}

func newTestPKI(tb testing.TB) *testPKI {
	tb.Helper()
	p := &testPKI{rootKey: newTestECKey(tb), interKey: newTestECKey(tb), leafKey: newTestECKey(tb)}
	root := p.caTemplate("Test Root")
	p.root = p.sign(tb, root, root, p.rootKey, p.rootKey)
	p.inter = p.sign(tb, p.caTemplate("Test Intermediate"), p.root, p.interKey, p.rootKey)
	p.leaf = p.issueLeaf(tb, p.leafKey, testCertName)
	return p
}

func (p *testPKI) caTemplate(cn string) *x509.Certificate {
	p.serial++
	return &x509.Certificate{
		SerialNumber:          big.NewInt(p.serial),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             testCertNow.Add(-24 * time.Hour),
		NotAfter:              testCertNow.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
}

// issueLeaf issues a leaf for names and key, signed by the intermediate.
func (p *testPKI) issueLeaf(tb testing.TB, key crypto.Signer, names ...string) *x509.Certificate {
	tb.Helper()
	p.serial++
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(p.serial),
		DNSNames:              names,
		NotBefore:             testCertNow.Add(-time.Hour),
		NotAfter:              testCertNow.Add(90 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	return p.sign(tb, tmpl, p.inter, key, p.interKey)
}

func (p *testPKI) sign(tb testing.TB, tmpl, parent *x509.Certificate, key, parentKey crypto.Signer) *x509.Certificate {
	tb.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

func newTestECKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

// encodeChain is certs as PEM CERTIFICATE blocks, in order.
func encodeChain(certs ...*x509.Certificate) []byte {
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return b
}

// encodeKey is key as a PKCS #8 PRIVATE KEY block.
func encodeKey(tb testing.TB, key crypto.PrivateKey) []byte {
	tb.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// checkCertErrKind names the type of a checkCert error.
func checkCertErrKind(err error) string {
	var bad *unusableError
	var exp *expiredError
	var early *notYetValidError
	switch {
	case err == nil:
		return "ok"
	case errors.As(err, &bad):
		return "unusable"
	case errors.As(err, &exp):
		return "expired"
	case errors.As(err, &early):
		return "not yet valid"
	default:
		return fmt.Sprintf("untyped %T", err)
	}
}

// keySignsFor reports whether key makes signatures that verify with the
// leaf's public key: the pairing checked apart from checkCert's own test.
func keySignsFor(key crypto.PrivateKey, leaf *x509.Certificate) error {
	s, ok := key.(crypto.Signer)
	if !ok {
		return fmt.Errorf("%T is not a crypto.Signer", key)
	}
	msg := []byte("checkCert pairing")
	digest := sha256.Sum256(msg)
	var algo x509.SignatureAlgorithm
	var sig []byte
	var err error
	switch s.Public().(type) {
	case *ecdsa.PublicKey:
		algo = x509.ECDSAWithSHA256
		sig, err = s.Sign(rand.Reader, digest[:], crypto.SHA256)
	case *rsa.PublicKey:
		algo = x509.SHA256WithRSA
		sig, err = s.Sign(rand.Reader, digest[:], crypto.SHA256)
	case ed25519.PublicKey:
		algo = x509.PureEd25519
		sig, err = s.Sign(rand.Reader, msg, crypto.Hash(0))
	default:
		return fmt.Errorf("unexpected key type %T", s.Public())
	}
	if err != nil {
		return err
	}
	return leaf.CheckSignature(algo, msg, sig)
}

// checkServed checks what checkCert returned without error for name at
// now: the leaf set and first, each certificate signed by the next, the
// name exactly ours, valid now, and the key the leaf's.
func checkServed(c *servedCert, name string, now time.Time) error {
	if c == nil || c.tls == nil || c.leaf == nil || c.tls.Leaf != c.leaf {
		return fmt.Errorf("returned %+v: leaf not set", c)
	}
	if len(c.tls.Certificate) == 0 || !bytes.Equal(c.tls.Certificate[0], c.leaf.Raw) {
		return errors.New("the chain does not start with the leaf")
	}
	for i := 0; i+1 < len(c.tls.Certificate); i++ {
		cert, err := x509.ParseCertificate(c.tls.Certificate[i])
		if err != nil {
			return fmt.Errorf("certificate %d: %w", i, err)
		}
		next, err := x509.ParseCertificate(c.tls.Certificate[i+1])
		if err != nil {
			return fmt.Errorf("certificate %d: %w", i+1, err)
		}
		if err := cert.CheckSignatureFrom(next); err != nil {
			return fmt.Errorf("certificate %d not signed by %d: %w", i, i+1, err)
		}
	}
	if len(c.leaf.DNSNames) != 1 || !strings.EqualFold(c.leaf.DNSNames[0], name) {
		return fmt.Errorf("accepted a certificate for %q", c.leaf.DNSNames)
	}
	if now.After(c.leaf.NotAfter) || now.Before(c.leaf.NotBefore.Add(-time.Hour)) {
		return fmt.Errorf("accepted a certificate valid from %v to %v at %v", c.leaf.NotBefore, c.leaf.NotAfter, now)
	}
	if err := keySignsFor(c.tls.PrivateKey, c.leaf); err != nil {
		return fmt.Errorf("the key does not sign for the leaf: %w", err)
	}
	return nil
}

// TestCheckCert: checkCert accepts a chain whose every certificate is
// whole and signed by the next, with the leaf's key, for exactly our name,
// valid now; and says exactly what is wrong with any other.
func TestCheckCert(t *testing.T) {
	t.Parallel()
	p := newTestPKI(t)
	full := encodeChain(p.leaf, p.inter)
	leafPEM, interPEM := encodeChain(p.leaf), encodeChain(p.inter)
	key := encodeKey(t, p.leafKey)

	// An intermediate of the same root, with another name and key.
	otherKey := newTestECKey(t)
	other := p.sign(t, p.caTemplate("Other Intermediate"), p.root, otherKey, p.rootKey)
	// One with the intermediate's name but not its key.
	impostor := p.sign(t, p.caTemplate("Test Intermediate"), p.root, otherKey, p.rootKey)
	// One with the intermediate's key but not its name.
	renamed := p.sign(t, p.caTemplate("Renamed Intermediate"), p.root, p.interKey, p.rootKey)

	ecKeyDER, err := x509.MarshalECPrivateKey(p.leafKey)
	if err != nil {
		t.Fatal(err)
	}
	sec1Key := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: ecKeyDER})
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rsaLeaf := p.issueLeaf(t, rsaKey, testCertName)
	pkcs1Key := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)})

	const badBase64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"
	crlf := bytes.ReplaceAll(cat(leafPEM, []byte("\n\n"), interPEM), []byte("\n"), []byte("\r\n"))

	for _, tc := range []struct {
		name      string
		cert, key []byte
		now       time.Time
		kind      string // what checkCertErrKind says
		msg       string // in the error message
	}{
		{name: "valid full chain", cert: full, key: key, kind: "ok"},
		{name: "leaf only", cert: leafPEM, key: key, kind: "ok"},
		{name: "chain with the root too", cert: encodeChain(p.leaf, p.inter, p.root), key: key, kind: "ok"},
		{name: "CRLF and blank lines around blocks", cert: cat([]byte("\r\n \t\n"), crlf, []byte("\r\n\r\n")), key: key, kind: "ok"},
		{name: "name in upper case", cert: encodeChain(p.issueLeaf(t, p.leafKey, strings.ToUpper(testCertName)), p.inter), key: key, kind: "ok"},
		{name: "SEC 1 EC key", cert: full, key: sec1Key, kind: "ok"},
		{name: "PKCS #1 RSA key", cert: encodeChain(rsaLeaf, p.inter), key: pkcs1Key, kind: "ok"},
		{name: "within the hour of clock skew", cert: full, key: key, now: p.leaf.NotBefore.Add(-30 * time.Minute), kind: "ok"},

		{name: "no certificate", cert: nil, key: key, kind: "unusable", msg: "certificate chain: no PEM block"},
		{name: "not PEM at all", cert: []byte("hello"), key: key, kind: "unusable", msg: "certificate chain: no PEM block"},
		{name: "trailing garbage after the last block", cert: cat(full, []byte("garbage\n")), key: key, kind: "unusable", msg: "certificate chain: trailing data after the last PEM block"},
		{name: "junk before the first block", cert: cat([]byte("junk\n"), full), key: key, kind: "unusable", msg: "certificate chain: data before the first PEM block"},
		{name: "junk between blocks", cert: cat(leafPEM, []byte("junk\n"), interPEM), key: key, kind: "unusable", msg: "certificate chain: data between PEM blocks 1 and 2"},
		{name: "truncated last block", cert: cat(leafPEM, interPEM[:len(interPEM)/2]), key: key, kind: "unusable", msg: "certificate chain: block 2 of 2 is truncated"},
		{name: "malformed block pem.Decode would skip", cert: cat([]byte(badBase64), full), key: key, kind: "unusable", msg: "certificate chain: block 1 of 3 is malformed"},
		{name: "block that is not a certificate", cert: []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), key: key, kind: "unusable", msg: "certificate chain: block 1 of 1 does not parse"},
		{name: "non-CERTIFICATE block in the chain", cert: cat(leafPEM, key), key: key, kind: "unusable", msg: `certificate chain: block 2 of 2 is a "PRIVATE KEY" block, not CERTIFICATE`},
		{name: "intermediate that did not sign the leaf", cert: encodeChain(p.leaf, other), key: key, kind: "unusable", msg: "certificate chain: intermediate 1 did not sign the leaf"},
		{name: "intermediate's name with another key", cert: encodeChain(p.leaf, impostor), key: key, kind: "unusable", msg: "certificate chain: intermediate 1 did not sign the leaf"},
		{name: "intermediate's key under another name", cert: encodeChain(p.leaf, renamed), key: key, kind: "unusable", msg: `certificate chain: intermediate 1 did not sign the leaf: the leaf names "CN=Test Intermediate" as its issuer, not "CN=Renamed Intermediate"`},
		{name: "root without the intermediate", cert: encodeChain(p.leaf, p.root), key: key, kind: "unusable", msg: "certificate chain: intermediate 1 did not sign the leaf"},
		{name: "unrelated certificate after the intermediate", cert: encodeChain(p.leaf, p.inter, other, p.root), key: key, kind: "unusable", msg: "certificate chain: intermediate 2 did not sign intermediate 1"},
		{name: "chain in wrong order", cert: encodeChain(p.inter, p.leaf), key: key, kind: "unusable", msg: "certificate chain: out of order: block 2 is signed by block 1"},

		{name: "no key", cert: full, key: nil, kind: "unusable", msg: "private key: no PEM block"},
		{name: "key that does not match", cert: full, key: encodeKey(t, otherKey), kind: "unusable", msg: "private key does not match the leaf's ECDSA public key"},
		{name: "key PEM with trailing data", cert: full, key: cat(key, []byte("trailing")), kind: "unusable", msg: "private key: trailing data after the last PEM block"},
		{name: "key PEM with junk before", cert: full, key: cat([]byte("junk\n"), key), kind: "unusable", msg: "private key: data before the first PEM block"},
		{name: "two keys", cert: full, key: cat(key, sec1Key), kind: "unusable", msg: "private key: 2 PEM blocks, want 1"},
		{name: "certificate as key", cert: full, key: leafPEM, kind: "unusable", msg: `private key: a "CERTIFICATE" block, not a private key`},
		{name: "key block that is not a key", cert: full, key: []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), kind: "unusable", msg: "private key: the PRIVATE KEY block holds no PKCS #1, PKCS #8 or SEC 1 key"},

		{name: "wrong name", cert: encodeChain(p.issueLeaf(t, p.leafKey, "*.k51other.example"), p.inter), key: key, kind: "unusable", msg: `certificate is for ["*.k51other.example"], not "*.k51test.example"`},
		{name: "two names", cert: encodeChain(p.issueLeaf(t, p.leafKey, testCertName, "*.example.com"), p.inter), key: key, kind: "unusable", msg: `certificate is for ["*.k51test.example" "*.example.com"]`},
		{name: "no name", cert: encodeChain(p.issueLeaf(t, p.leafKey), p.inter), key: key, kind: "unusable", msg: "certificate is for []"},

		{name: "expired", cert: full, key: key, now: p.leaf.NotAfter.Add(time.Second), kind: "expired", msg: "certificate expired at " + p.leaf.NotAfter.Format(time.RFC3339)},
		{name: "not yet valid", cert: full, key: key, now: p.leaf.NotBefore.Add(-2 * time.Hour), kind: "not yet valid", msg: "certificate is not valid before " + p.leaf.NotBefore.Format(time.RFC3339)},
		{name: "expired and broken", cert: cat(full, []byte("x")), key: key, now: p.leaf.NotAfter.Add(time.Second), kind: "unusable", msg: "trailing data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			now := tc.now
			if now.IsZero() {
				now = testCertNow
			}
			c, err := checkCert(tc.cert, tc.key, testCertName, now)
			if kind := checkCertErrKind(err); kind != tc.kind {
				t.Fatalf("checkCert: %s error %v, want %s", kind, err, tc.kind)
			}
			if err != nil {
				if c != nil {
					t.Errorf("checkCert returned %+v with its error", c)
				}
				if !strings.Contains(err.Error(), tc.msg) {
					t.Errorf("error %q does not say %q", err, tc.msg)
				}
				return
			}
			if err := checkServed(c, testCertName, now); err != nil {
				t.Fatal(err)
			}
			var want [][]byte
			for rest := tc.cert; ; {
				var b *pem.Block
				if b, rest = pem.Decode(rest); b == nil {
					break
				}
				want = append(want, b.Bytes)
			}
			if len(c.tls.Certificate) != len(want) {
				t.Fatalf("served %d certificates, want %d", len(c.tls.Certificate), len(want))
			}
			for i := range want {
				if !bytes.Equal(c.tls.Certificate[i], want[i]) {
					t.Errorf("served certificate %d is not block %d", i, i+1)
				}
			}
		})
	}
}

// FuzzCheckCertChain: whatever the bytes of certificate and key, checkCert
// gives an error or a certificate that checkServed accepts; never a panic.
// (FuzzCheckCert in security_test.go fuzzes a self-signed leaf alone.)
func FuzzCheckCertChain(f *testing.F) {
	p := newTestPKI(f)
	full := encodeChain(p.leaf, p.inter)
	leafPEM, interPEM := encodeChain(p.leaf), encodeChain(p.inter)
	key := encodeKey(f, p.leafKey)
	f.Add(full, key)
	f.Add(leafPEM, key)
	f.Add(encodeChain(p.leaf, p.inter, p.root), key)
	f.Add(cat(full, []byte("garbage\n")), key)
	f.Add(cat(leafPEM, []byte("junk\n"), interPEM), key)
	f.Add(cat(leafPEM, interPEM[:len(interPEM)/2]), key)
	f.Add(encodeChain(p.inter, p.leaf), key)
	f.Add(encodeChain(p.leaf, p.root), key)
	f.Add(full, cat(key, []byte("x")))
	f.Add(full, encodeKey(f, p.interKey))
	f.Fuzz(func(t *testing.T, certPEM, keyPEM []byte) {
		c, err := checkCert(certPEM, keyPEM, testCertName, testCertNow)
		if err != nil {
			if c != nil {
				t.Fatalf("returned %+v with error %v", c, err)
			}
			if kind := checkCertErrKind(err); strings.HasPrefix(kind, "untyped") {
				t.Fatalf("%s error: %v", kind, err)
			}
			return
		}
		if err := checkServed(c, testCertName, testCertNow); err != nil {
			t.Fatal(err)
		}
	})
}
