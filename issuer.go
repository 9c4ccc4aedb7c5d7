package autotls

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/mholt/acmez/v3"
	"github.com/mholt/acmez/v3/acme"
)

// acmeIssuer is the certmagic.Issuer that runs the ACME order with our
// DNS-01 solver. It is ours rather than certmagic's ACMEIssuer so that
// every wait is the CA's own (no process-wide throttle shared between hosts,
// polling that honours Retry-After) and so that ARI's "replaces" is only
// sent for a certificate that is still valid.
type acmeIssuer struct {
	client  *acmez.Client
	storage certmagic.Storage
	email   string
	profile string
	key     string
	log     *slog.Logger
	// current returns the leaf being served, if any; it is named in the
	// order's "replaces" field while it is unexpired (ARI, RFC 9773).
	current func() *x509.Certificate
	now     func() time.Time

	// trace, if set, is told when issuance reaches each [tracePoint]. It
	// is nil in production; the benchmarks set it for their phase
	// breakdown.
	trace func(tracePoint)

	mu      sync.Mutex
	account *acme.Account
}

// tracePoint is a step of one issuance, for the benchmarks' phase
// breakdown. The steps are reported in this order.
type tracePoint uint8

const (
	traceIssue      tracePoint = iota // certmagic called Issue
	traceAccount                      // the ACME account is ready (loaded or registered)
	tracePresenting                   // the order exists; the solver starts presenting
	tracePresented                    // the broker accepted the challenge
	traceVisible                      // the TXT record is visible through the resolver
	traceValid                        // the CA validated every authorization
	traceIssued                       // the certificate chain is downloaded
)

// at calls the trace hook, if any.
func (i *acmeIssuer) at(p tracePoint) {
	if i.trace != nil {
		i.trace(p)
	}
}

var (
	_ certmagic.Issuer            = (*acmeIssuer)(nil)
	_ certmagic.RenewalInfoGetter = (*acmeIssuer)(nil)
)

type issuerConfig struct {
	caURL        string
	roots        *x509.CertPool
	userAgent    string
	email        string
	profile      string
	pollInterval time.Duration
	storage      certmagic.Storage
	solver       acmez.Solver
	log          *slog.Logger
	current      func() *x509.Certificate
	now          func() time.Time
}

func newACMEIssuer(c issuerConfig) *acmeIssuer {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: c.roots, MinVersion: tls.VersionTLS12}
	tr.Proxy = nil
	return &acmeIssuer{
		client: &acmez.Client{
			Client: &acme.Client{
				Directory:    c.caURL,
				HTTPClient:   &http.Client{Transport: tr, Timeout: 60 * time.Second},
				UserAgent:    c.userAgent,
				PollInterval: c.pollInterval,
				Logger:       c.log,
			},
			ChallengeSolvers: map[string]acmez.Solver{acme.ChallengeTypeDNS01: c.solver},
		},
		storage: c.storage,
		email:   c.email,
		profile: c.profile,
		key:     issuerKey(c.caURL),
		log:     c.log,
		current: c.current,
		now:     c.now,
	}
}

// issuerKey names the CA in storage paths, like certmagic's ACME issuer
// does: the directory URL's host and path.
func issuerKey(caURL string) string {
	u, err := url.Parse(caURL)
	if err != nil {
		return certmagic.StorageKeys.Safe(caURL)
	}
	return certmagic.StorageKeys.Safe(strings.ReplaceAll(u.Host+u.Path, "/", "-"))
}

// IssuerKey implements certmagic.Issuer.
func (i *acmeIssuer) IssuerKey() string { return i.key }

// Issue implements certmagic.Issuer: one ACME order for the CSR's names.
func (i *acmeIssuer) Issue(ctx context.Context, csr *x509.CertificateRequest) (*certmagic.IssuedCertificate, error) {
	i.at(traceIssue)
	for attempt := 0; ; attempt++ {
		account, err := i.getAccount(ctx)
		if err != nil {
			return nil, err
		}
		i.at(traceAccount)
		params, err := acmez.OrderParametersFromCSR(account, csr)
		if err != nil {
			return nil, fmt.Errorf("preparing the ACME order: %w", err)
		}
		params.Profile = i.profile
		if cur := i.current(); cur != nil && i.now().Before(cur.NotAfter) {
			params.Replaces = cur
		}
		chains, err := i.client.ObtainCertificate(ctx, params)
		var prob acme.Problem
		if err != nil && attempt == 0 && errors.As(err, &prob) && prob.Type == acme.ProblemTypeAccountDoesNotExist {
			// The CA forgot the account (reset, or a private CA restarted):
			// make a new one and try once more.
			i.log.Info("ACME account unknown to the CA; creating a new one", "ca", i.client.Directory)
			if err := i.forgetAccount(ctx); err != nil {
				return nil, err
			}
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("ACME order at %s: %w", i.client.Directory, err)
		}
		if len(chains) == 0 {
			return nil, fmt.Errorf("ACME order at %s: the CA returned no certificate", i.client.Directory)
		}
		i.at(traceIssued)
		return &certmagic.IssuedCertificate{Certificate: chains[0].ChainPEM, Metadata: chains[0]}, nil
	}
}

// GetRenewalInfo implements certmagic.RenewalInfoGetter (ARI).
func (i *acmeIssuer) GetRenewalInfo(ctx context.Context, cert certmagic.Certificate) (acme.RenewalInfo, error) {
	return i.client.GetRenewalInfo(ctx, cert.Leaf)
}

// storedAccount is the ACME account as kept in storage.
type storedAccount struct {
	Location      string   `json:"location"`
	Contact       []string `json:"contact,omitempty"`
	PrivateKeyPEM string   `json:"private_key_pem"`
}

func (i *acmeIssuer) accountKey() string {
	name := "default"
	if i.email != "" {
		name = certmagic.StorageKeys.Safe(i.email)
	}
	return "autotls/acme/" + i.key + "/accounts/" + name + ".json"
}

// getAccount loads the ACME account from storage, or registers one with
// the CA and stores it.
func (i *acmeIssuer) getAccount(ctx context.Context) (acme.Account, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.account != nil {
		return *i.account, nil
	}
	raw, err := i.storage.Load(ctx, i.accountKey())
	switch {
	case err == nil:
		acct, perr := parseStoredAccount(raw)
		if perr == nil {
			i.account = &acct
			return acct, nil
		}
		i.log.Warn("stored ACME account unusable; registering a new one", "key", i.accountKey(), "err", perr)
	case !errors.Is(err, fs.ErrNotExist):
		return acme.Account{}, fmt.Errorf("loading the ACME account from storage: %w", err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return acme.Account{}, fmt.Errorf("generating the ACME account key: %w", err)
	}
	acct := acme.Account{TermsOfServiceAgreed: true, PrivateKey: key}
	if i.email != "" {
		acct.Contact = []string{"mailto:" + i.email}
	}
	acct, err = i.client.NewAccount(ctx, acct)
	if err != nil {
		return acme.Account{}, fmt.Errorf("registering an ACME account at %s: %w", i.client.Directory, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return acme.Account{}, fmt.Errorf("encoding the ACME account key: %w", err)
	}
	blob, err := json.Marshal(storedAccount{
		Location:      acct.Location,
		Contact:       acct.Contact,
		PrivateKeyPEM: string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
	})
	if err != nil {
		return acme.Account{}, fmt.Errorf("encoding the ACME account: %w", err)
	}
	if err := i.storage.Store(ctx, i.accountKey(), blob); err != nil {
		return acme.Account{}, fmt.Errorf("storing the ACME account: %w", err)
	}
	i.account = &acct
	return acct, nil
}

func parseStoredAccount(raw []byte) (acme.Account, error) {
	var sa storedAccount
	if err := json.Unmarshal(raw, &sa); err != nil {
		return acme.Account{}, fmt.Errorf("decoding: %w", err)
	}
	block, _ := pem.Decode([]byte(sa.PrivateKeyPEM))
	if block == nil || sa.Location == "" {
		return acme.Account{}, errors.New("no key or location")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return acme.Account{}, fmt.Errorf("parsing the key: %w", err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return acme.Account{}, errors.New("key cannot sign")
	}
	return acme.Account{Status: acme.StatusValid, Location: sa.Location, Contact: sa.Contact, TermsOfServiceAgreed: true, PrivateKey: signer}, nil
}

func (i *acmeIssuer) forgetAccount(ctx context.Context) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.account = nil
	if err := i.storage.Delete(ctx, i.accountKey()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("deleting the stale ACME account: %w", err)
	}
	return nil
}
