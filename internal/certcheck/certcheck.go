// Package certcheck checks a certificate chain and private key, as stored
// or as issued, before autotls serves them: the library and cmd/autotls
// give the same verdict on the same pair.
package certcheck

import (
	"bytes"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"time"
)

// UnusableError: the certificate can never be ours, whatever the time:
// corrupt, a chain that does not link, for another name, or not matching
// its key.
type UnusableError struct{ Err error }

func (e *UnusableError) Error() string { return e.Err.Error() }
func (e *UnusableError) Unwrap() error { return e.Err }

// ExpiredError: the certificate was ours but its validity has ended.
type ExpiredError struct{ NotAfter time.Time }

func (e *ExpiredError) Error() string {
	return "certificate expired at " + e.NotAfter.Format(time.RFC3339)
}

// NotYetValidError: the certificate is ours but starts later than the
// clock skew we allow; it may be usable later, or the clock is wrong.
type NotYetValidError struct{ NotBefore time.Time }

func (e *NotYetValidError) Error() string {
	return "certificate is not valid before " + e.NotBefore.Format(time.RFC3339)
}

// NotBeforeSkew is how far a certificate's NotBefore may be ahead of our
// clock: a CA's clock, or ours, may be off by that much.
const NotBeforeSkew = time.Hour

// Check parses a PEM certificate chain and PEM private key and checks
// them whole: the chain is one or more CERTIFICATE blocks with nothing but
// whitespace around them, the leaf first; each certificate is signed by
// the next (the root, not in the chain, is not checked); the key is one PEM
// block (PKCS #8, SEC 1 EC or PKCS #1 RSA) matching the leaf; the leaf
// names exactly name (case-insensitive). Any of these failing gives an
// *UnusableError. A certificate otherwise fine gives an *ExpiredError after
// its NotAfter, and a *NotYetValidError more than an hour before its
// NotBefore.
// On success it returns the pair ready to serve, its Leaf set.
func Check(certPEM, keyPEM []byte, name string, now time.Time) (*tls.Certificate, error) {
	certs, err := parseChain(certPEM)
	if err != nil {
		return nil, &UnusableError{fmt.Errorf("certificate chain: %w", err)}
	}
	if err := checkLinks(certs); err != nil {
		return nil, &UnusableError{fmt.Errorf("certificate chain: %w", err)}
	}
	leaf := certs[0]
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, &UnusableError{fmt.Errorf("private key: %w", err)}
	}
	pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(key.Public()) {
		return nil, &UnusableError{fmt.Errorf("private key does not match the leaf's %s public key", leaf.PublicKeyAlgorithm)}
	}
	if len(leaf.DNSNames) != 1 || !strings.EqualFold(leaf.DNSNames[0], name) {
		return nil, &UnusableError{fmt.Errorf("certificate is for %q, not %q", leaf.DNSNames, name)}
	}
	if now.After(leaf.NotAfter) {
		return nil, &ExpiredError{leaf.NotAfter}
	}
	if now.Before(leaf.NotBefore.Add(-NotBeforeSkew)) {
		return nil, &NotYetValidError{leaf.NotBefore}
	}
	tc := &tls.Certificate{PrivateKey: key, Leaf: leaf}
	for _, c := range certs {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	return tc, nil
}

// parseChain parses every block of certPEM as a certificate, in order.
func parseChain(certPEM []byte) ([]*x509.Certificate, error) {
	blocks, err := pemBlocks(certPEM)
	if err != nil {
		return nil, err
	}
	certs := make([]*x509.Certificate, len(blocks))
	for i, b := range blocks {
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("block %d of %d is a %q block, not CERTIFICATE", i+1, len(blocks), b.Type)
		}
		if certs[i], err = x509.ParseCertificate(b.Bytes); err != nil {
			return nil, fmt.Errorf("block %d of %d does not parse: %w", i+1, len(blocks), err)
		}
	}
	return certs, nil
}

// checkLinks checks that each certificate of the chain names the next as
// its issuer and carries its signature.
func checkLinks(certs []*x509.Certificate) error {
	role := func(i int) string {
		if i == 0 {
			return "the leaf"
		}
		return fmt.Sprintf("intermediate %d", i)
	}
	for i := 0; i+1 < len(certs); i++ {
		c, next := certs[i], certs[i+1]
		err := c.CheckSignatureFrom(next)
		if err == nil && !bytes.Equal(c.RawIssuer, next.RawSubject) {
			err = fmt.Errorf("%s names %q as its issuer, not %q", role(i), c.Issuer, next.Subject)
		}
		if err == nil {
			continue
		}
		if bytes.Equal(next.RawIssuer, c.RawSubject) && next.CheckSignatureFrom(c) == nil {
			return fmt.Errorf("out of order: block %d is signed by block %d before it; the leaf comes first, then each certificate's issuer", i+2, i+1)
		}
		return fmt.Errorf("%s did not sign %s: %w", role(i+1), role(i), err)
	}
	return nil
}

// parseKey parses keyPEM as exactly one PEM private key that can sign.
func parseKey(keyPEM []byte) (crypto.Signer, error) {
	blocks, err := pemBlocks(keyPEM)
	if err != nil {
		return nil, err
	}
	if len(blocks) != 1 {
		return nil, fmt.Errorf("%d PEM blocks, want 1", len(blocks))
	}
	b := blocks[0]
	if b.Type != "PRIVATE KEY" && !strings.HasSuffix(b.Type, " PRIVATE KEY") {
		return nil, fmt.Errorf("a %q block, not a private key", b.Type)
	}
	// As crypto/tls does, whatever the block's type says.
	var k any
	if k, err = x509.ParsePKCS1PrivateKey(b.Bytes); err != nil {
		if k, err = x509.ParsePKCS8PrivateKey(b.Bytes); err != nil {
			if k, err = x509.ParseECPrivateKey(b.Bytes); err != nil {
				return nil, fmt.Errorf("the %s block holds no PKCS #1, PKCS #8 or SEC 1 key", b.Type)
			}
		}
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("a %T cannot sign", k)
	}
	return s, nil
}

// pemWhitespace is what may stand around PEM blocks.
const pemWhitespace = " \t\r\n"

// pemBlocks decodes data as one or more PEM blocks with nothing but
// whitespace before, between and after them. pem.Decode alone skips
// anything that is not a block, malformed blocks included.
func pemBlocks(data []byte) ([]*pem.Block, error) {
	n := countBegins(data)
	var blocks []*pem.Block
	rest := data
	for {
		body := bytes.TrimLeft(rest, pemWhitespace)
		if len(body) == 0 {
			break
		}
		if !bytes.HasPrefix(body, []byte("-----BEGIN ")) {
			switch {
			case len(blocks) == 0 && n == 0:
				return nil, errors.New("no PEM block")
			case len(blocks) == 0:
				return nil, errors.New("data before the first PEM block")
			case countBegins(body) > 0:
				return nil, fmt.Errorf("data between PEM blocks %d and %d", len(blocks), len(blocks)+1)
			default:
				return nil, errors.New("trailing data after the last PEM block")
			}
		}
		i := len(blocks) + 1
		b, after := pem.Decode(body)
		// pem.Decode may skip a broken block for a later one: then what it
		// consumed holds more than one BEGIN line.
		if b == nil || countBegins(body[:len(body)-len(after)]) != 1 {
			own := body
			if j := bytes.Index(body, []byte("\n-----BEGIN ")); j >= 0 {
				own = body[:j]
			}
			if !bytes.Contains(own, []byte("\n-----END ")) {
				return nil, fmt.Errorf("block %d of %d is truncated", i, n)
			}
			return nil, fmt.Errorf("block %d of %d is malformed", i, n)
		}
		blocks = append(blocks, b)
		rest = after
	}
	if len(blocks) == 0 {
		return nil, errors.New("no PEM block")
	}
	return blocks, nil
}

// countBegins counts the PEM BEGIN lines of data, as pem.Decode finds
// them: at the start of data or of a line.
func countBegins(data []byte) int {
	begin := []byte("-----BEGIN ")
	n := bytes.Count(data, append([]byte{'\n'}, begin...))
	if bytes.HasPrefix(data, begin) {
		n++
	}
	return n
}
