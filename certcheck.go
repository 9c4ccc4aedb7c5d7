package autotls

import (
	"crypto/tls"
	"crypto/x509"
	"time"

	"github.com/p2ptls/autotls/internal/certcheck"
)

// servedCert is a certificate ready to serve and its parsed leaf.
type servedCert struct {
	tls  *tls.Certificate // Leaf set
	leaf *x509.Certificate
}

// The verdicts of [checkCert] ([certcheck.Check]).
type (
	unusableError    = certcheck.UnusableError
	expiredError     = certcheck.ExpiredError
	notYetValidError = certcheck.NotYetValidError
)

// checkCert checks a PEM certificate chain and key whole for name at now
// ([certcheck.Check]: every block, the chain's links, the key, the name,
// the validity) and returns them ready to serve.
func checkCert(certPEM, keyPEM []byte, name string, now time.Time) (*servedCert, error) {
	tc, err := certcheck.Check(certPEM, keyPEM, name, now)
	if err != nil {
		return nil, err
	}
	return &servedCert{tls: tc, leaf: tc.Leaf}, nil
}
