package testforge

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/mholt/acmez/v3"
	"github.com/mholt/acmez/v3/acme"
)

// directPollInterval is the authz/order poll interval of [Forge.IssueDirect]
// when Pebble sends no Retry-After: small, so the figure is round trips and
// not sleeps.
const directPollInterval = 5 * time.Millisecond

// IssueDirect obtains a certificate for [Forge.CertName](id) from the CA
// with a fresh ACME account, solving DNS-01 by writing the value with
// [Forge.SetTXT]: no broker, no libp2p, no propagation wait. It is the floor
// the full AutoTLS flow is measured against. certKey is the certificate's
// key. The chains are as Pebble returns them, leaf first.
func (f *Forge) IssueDirect(ctx context.Context, id peer.ID, certKey crypto.Signer) ([]acme.Certificate, error) {
	httpClient := f.CAClient()
	defer httpClient.CloseIdleConnections()
	client := &acmez.Client{
		Client: &acme.Client{
			Directory:    f.CAURL,
			HTTPClient:   httpClient,
			UserAgent:    "autotls-testforge",
			PollInterval: directPollInterval,
			Logger:       quiet(f.log.With("component", "acme-direct")),
		},
		ChallengeSolvers: map[string]acmez.Solver{
			acme.ChallengeTypeDNS01: directSolver{f: f, id: id},
		},
	}
	accountKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating account key: %w", err)
	}
	account, err := client.NewAccount(ctx, acme.Account{
		TermsOfServiceAgreed: true,
		PrivateKey:           accountKey,
	})
	if err != nil {
		return nil, fmt.Errorf("creating ACME account: %w", err)
	}
	certs, err := client.ObtainCertificateForSANs(ctx, account, certKey, []string{f.CertName(id)})
	if err != nil {
		return nil, fmt.Errorf("obtaining certificate: %w", err)
	}
	return certs, nil
}

// directSolver solves DNS-01 for one peer by writing the forge's store.
type directSolver struct {
	f  *Forge
	id peer.ID
}

var _ acmez.Solver = directSolver{}

func (s directSolver) Present(_ context.Context, chal acme.Challenge) error {
	s.f.SetTXT(s.id, chal.DNS01KeyAuthorization())
	return nil
}

func (s directSolver) CleanUp(context.Context, acme.Challenge) error { return nil }
