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
	"slices"
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
// sent for a certificate that is still valid. It drives the order itself
// with acmez's low-level client, for the same reason: acmez's own flow
// sleeps a fixed interval before every poll.
type acmeIssuer struct {
	client  *acme.Client
	solver  acmez.Solver
	storage certmagic.Storage
	email   string
	profile string
	key     string
	name    string // the certificate's name, for the pending order
	log     *slog.Logger
	// current returns the leaf being served, if any; it is named in the
	// order's "replaces" field while it is unexpired (ARI, RFC 9773).
	current func() *x509.Certificate
	now     func() time.Time
	// pollFirst is the wait before the first poll of an authorization or
	// an order.
	pollFirst time.Duration
	// retryAfter holds the CA's last Retry-After.
	retryAfter *retryAfterTransport

	// trace, if set, is told when issuance reaches each [tracePoint]. It
	// is nil in production; the benchmarks set it for their phase
	// breakdown.
	trace func(tracePoint)

	mu      sync.Mutex
	account *acme.Account

	keyMu   sync.Mutex
	lastKey crypto.Signer // the certificate key GenerateKey last gave
}

// Polling of authorizations and orders. A CA often validates a DNS-01
// challenge or issues a certificate within milliseconds of being asked
// (Pebble on loopback: under 1 ms); acmez's fixed 250 ms before every poll
// made most of the time to a certificate. The first poll comes after
// pollFirst, then the interval triples up to pollMax. Against a CA that
// takes a second or more (Let's Encrypt, validating from several vantage
// points), that is about as many polls as acmez's fixed interval (6 in the
// first second against 4, 8 in the first three against 12, then one a
// second against four), the extra ones being tiny POST-as-GETs in the
// first 15 ms. A Retry-After from the CA replaces the interval exactly:
// the next poll is sent when it says, no sooner and no later.
const (
	defaultPollFirst = time.Millisecond
	pollGrowth       = 3
	pollMax          = time.Second
	// pollTimeout bounds the polling of one authorization or order, as
	// acmez's default does.
	pollTimeout = 5 * time.Minute
)

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
	_ certmagic.KeyGenerator      = (*acmeIssuer)(nil)
)

type issuerConfig struct {
	caURL     string
	roots     *x509.CertPool
	userAgent string
	email     string
	profile   string
	// pollInterval is the wait before the first poll; 0 means
	// defaultPollFirst.
	pollInterval time.Duration
	storage      certmagic.Storage
	name         string
	solver       acmez.Solver
	log          *slog.Logger
	current      func() *x509.Certificate
	now          func() time.Time
}

func newACMEIssuer(c issuerConfig) *acmeIssuer {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: c.roots, MinVersion: tls.VersionTLS12}
	tr.Proxy = nil
	ra := &retryAfterTransport{next: tr}
	pollFirst := c.pollInterval
	if pollFirst <= 0 {
		pollFirst = defaultPollFirst
	}
	return &acmeIssuer{
		client: &acme.Client{
			Directory:  c.caURL,
			HTTPClient: &http.Client{Transport: ra, Timeout: 60 * time.Second},
			UserAgent:  c.userAgent,
			// The issuer polls; FinalizeOrder must not. A negative
			// timeout makes it return at once with the order as the
			// CA left it (still processing, perhaps) instead of polling
			// with a fixed interval. Were that ever ignored, the
			// interval would be pollMax, which is polite.
			PollTimeout:  -1,
			PollInterval: pollMax,
			Logger:       c.log,
		},
		solver:     c.solver,
		storage:    c.storage,
		email:      c.email,
		profile:    c.profile,
		key:        issuerKey(c.caURL),
		name:       c.name,
		log:        c.log,
		current:    c.current,
		now:        c.now,
		pollFirst:  pollFirst,
		retryAfter: ra,
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
		chains, err := i.order(ctx, account, csr)
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

// refusedReplaces tells whether err, from creating an order that names the
// certificate it replaces, may be about that name: any ACME problem except
// those that say to come back later (rate limits, 429, 503), which an order
// without "replaces" would meet as well.
func refusedReplaces(err error) bool {
	var prob acme.Problem
	if !errors.As(err, &prob) {
		return false
	}
	switch {
	case prob.Type == acme.ProblemTypeRateLimited,
		prob.Status == http.StatusTooManyRequests,
		prob.Status == http.StatusServiceUnavailable:
		return false
	}
	return true
}

// order runs one ACME order for csr's names (RFC 8555 §7.1): it creates the
// order, or takes up the pending one, solves its authorizations, finalizes
// it and downloads the chains.
func (i *acmeIssuer) order(ctx context.Context, account acme.Account, csr *x509.CertificateRequest) ([]acme.Certificate, error) {
	params, err := acmez.OrderParametersFromCSR(account, csr)
	if err != nil {
		return nil, fmt.Errorf("preparing the order: %w", err)
	}
	order, resumed := i.resumeOrder(ctx, account, csr, params.Identifiers)
	if !resumed {
		if order, err = i.newOrder(ctx, account, params.Identifiers); err != nil {
			return nil, err
		}
	}

	switch order.Status {
	case acme.StatusValid:
	case acme.StatusProcessing:
		if order, err = i.pollOrder(ctx, account, order); err != nil {
			return nil, err
		}
	default: // pending, or ready if every authorization is valid already
		if err := i.authorize(ctx, account, order); err != nil {
			return nil, err
		}
		i.at(traceValid)
		i.rememberOrder(ctx, csr, order.Location)
		if order, err = i.finalize(ctx, account, order, csr.Raw); err != nil {
			return nil, err
		}
	}
	chains, err := i.client.GetCertificateChain(ctx, account, order.Certificate)
	if err != nil {
		return nil, fmt.Errorf("downloading the certificate %s: %w", order.Certificate, err)
	}
	return chains, nil
}

// newOrder creates an order for ids. While the certificate in use is
// unexpired the order names it in "replaces" (ARI).
func (i *acmeIssuer) newOrder(ctx context.Context, account acme.Account, ids []acme.Identifier) (acme.Order, error) {
	order := acme.Order{Identifiers: ids, Profile: i.profile}
	if cur := i.current(); cur != nil && i.now().Before(cur.NotAfter) {
		var err error
		if order.Replaces, err = acme.ARIUniqueIdentifier(cur); err != nil {
			return acme.Order{}, fmt.Errorf("naming the certificate replaced: %w", err)
		}
	}
	created, err := i.client.NewOrder(ctx, account, order)
	if err != nil && order.Replaces != "" && refusedReplaces(err) {
		// "replaces" only earns the renewal ARI's treatment; it must never
		// stand between the host and its renewal. An earlier order may have
		// named the certificate already (alreadyReplaced), or the CA may not
		// find the certificate (Pebble answers 500 for some serials): order
		// again without it.
		i.log.Debug("the CA refused the order naming the certificate it replaces; ordering without", "err", err)
		order.Replaces = ""
		created, err = i.client.NewOrder(ctx, account, order)
	}
	if err != nil {
		return acme.Order{}, fmt.Errorf("creating the order: %w", err)
	}
	return created, nil
}

// authorize solves the order's pending authorizations with DNS-01: it
// presents every challenge, then, for each, waits until the solver is ready
// and asks the CA to validate, then polls each authorization until it is
// valid. If it fails, the authorizations still pending are deactivated, so
// that they do not count against the CA's limit on pending authorizations;
// valid ones are kept for the CA to reuse.
func (i *acmeIssuer) authorize(ctx context.Context, account acme.Account, order acme.Order) (err error) {
	type pending struct {
		authz acme.Authorization
		chal  acme.Challenge
	}
	var todo []pending
	defer func() {
		for _, p := range todo {
			if cerr := i.solver.CleanUp(ctx, p.chal); cerr != nil {
				i.log.Debug("cleaning up the DNS-01 challenge", "identifier", p.authz.IdentifierValue(), "err", cerr)
			}
			if err != nil && p.authz.Status == acme.StatusPending && ctx.Err() == nil {
				if _, derr := i.client.DeactivateAuthorization(ctx, account, p.authz.Location); derr != nil {
					i.log.Debug("deactivating the authorization", "authz", p.authz.Location, "err", derr)
				}
			}
		}
	}()
	for _, u := range order.Authorizations {
		authz, err := i.client.GetAuthorization(ctx, account, u)
		if err != nil {
			return fmt.Errorf("reading the authorization %s: %w", u, err)
		}
		switch authz.Status {
		case acme.StatusValid:
			continue // validated recently: the CA reuses it
		case acme.StatusPending:
		default:
			return fmt.Errorf("authorization for %s is %s", authz.IdentifierValue(), authz.Status)
		}
		k := slices.IndexFunc(authz.Challenges, func(c acme.Challenge) bool { return c.Type == acme.ChallengeTypeDNS01 })
		if k < 0 {
			return fmt.Errorf("the CA offers no %s challenge for %s", acme.ChallengeTypeDNS01, authz.IdentifierValue())
		}
		todo = append(todo, pending{authz, authz.Challenges[k]})
	}

	for _, p := range todo {
		if err := i.solver.Present(ctx, p.chal); err != nil {
			return fmt.Errorf("presenting the challenge for %s: %w", p.authz.IdentifierValue(), err)
		}
	}
	for k, p := range todo {
		if w, ok := i.solver.(acmez.Waiter); ok {
			if err := w.Wait(ctx, p.chal); err != nil {
				return fmt.Errorf("waiting for the challenge for %s: %w", p.authz.IdentifierValue(), err)
			}
		}
		chal, err := i.client.InitiateChallenge(ctx, account, p.chal)
		if err != nil {
			return fmt.Errorf("asking the CA to validate %s: %w", p.authz.IdentifierValue(), err)
		}
		// A Retry-After on the challenge's response is for the first poll
		// of its authorization. (The transport keeps one: with several
		// authorizations, only the last one's would be kept. Our orders
		// have one.)
		i.retryAfter.move(p.chal.URL, p.authz.Location)
		if chal.Status == acme.StatusValid {
			todo[k].authz.Status = acme.StatusValid
		}
	}
	for k := range todo {
		if todo[k].authz.Status == acme.StatusValid {
			continue
		}
		todo[k].authz, err = i.pollAuthorization(ctx, account, todo[k].authz)
		if err != nil {
			return err
		}
	}
	return nil
}

// pollAuthorization polls authz until the CA has decided.
func (i *acmeIssuer) pollAuthorization(ctx context.Context, account acme.Account, authz acme.Authorization) (acme.Authorization, error) {
	err := i.poll(ctx, authz.Location, func() (bool, error) {
		a, err := i.client.GetAuthorization(ctx, account, authz.Location)
		if err != nil {
			return false, fmt.Errorf("polling the authorization for %s: %w", authz.IdentifierValue(), err)
		}
		authz = a
		switch authz.Status {
		case acme.StatusPending:
			return false, nil
		case acme.StatusValid:
			return true, nil
		case acme.StatusInvalid:
			// The problem is the failed challenge's, as acmez reports it,
			// so that errors.As finds an acme.Problem.
			var prob acme.Problem
			for _, c := range authz.Challenges {
				if c.Error != nil {
					prob = *c.Error
					break
				}
			}
			prob.Resource = authz
			return true, fmt.Errorf("the CA could not validate %s: %w", authz.IdentifierValue(), prob)
		default:
			return true, fmt.Errorf("authorization for %s is %s", authz.IdentifierValue(), authz.Status)
		}
	})
	return authz, err
}

// finalize sends the CSR and polls the order until the certificate is
// issued.
func (i *acmeIssuer) finalize(ctx context.Context, account acme.Account, order acme.Order, csrDER []byte) (acme.Order, error) {
	// With PollTimeout < 0, FinalizeOrder returns as soon as the CA has
	// answered: done, failed, or still processing ("order took too long").
	finalized, err := i.client.FinalizeOrder(ctx, account, order, csrDER)
	switch {
	case finalized.Status == acme.StatusValid:
		return finalized, nil
	case finalized.Status != acme.StatusProcessing && err != nil:
		return finalized, fmt.Errorf("finalizing the order %s: %w", order.Location, err)
	case finalized.Status != acme.StatusProcessing:
		return finalized, fmt.Errorf("finalizing the order %s: the order is %s", order.Location, finalized.Status)
	}
	// The finalize response's Retry-After, if any, is for the first poll.
	i.retryAfter.move(order.Finalize, finalized.Location)
	return i.pollOrder(ctx, account, finalized)
}

// pollOrder polls a processing order until the certificate is issued.
func (i *acmeIssuer) pollOrder(ctx context.Context, account acme.Account, order acme.Order) (acme.Order, error) {
	err := i.poll(ctx, order.Location, func() (bool, error) {
		o, err := i.client.GetOrder(ctx, account, order)
		if err != nil {
			return false, fmt.Errorf("polling the order %s: %w", order.Location, err)
		}
		order = o
		switch order.Status {
		case acme.StatusProcessing:
			return false, nil
		case acme.StatusValid:
			return true, nil
		case acme.StatusInvalid:
			if order.Error != nil {
				return true, fmt.Errorf("the CA refused to issue: %w", *order.Error)
			}
			return true, errors.New("the CA refused to issue")
		default:
			return true, fmt.Errorf("order %s is %s after finalization", order.Location, order.Status)
		}
	})
	return order, err
}

// poll calls check until it reports done, waiting before each call: until
// the time named by the Retry-After of the CA's last response for loc, if
// it sent one, or else pollFirst, growing by pollGrowth to pollMax. It gives
// up after pollTimeout.
func (i *acmeIssuer) poll(ctx context.Context, loc string, check func() (done bool, err error)) error {
	ctx, cancel := context.WithTimeout(ctx, pollTimeout)
	defer cancel()
	interval := i.pollFirst
	for {
		wait := interval
		if at, ok := i.retryAfter.take(loc); ok {
			wait = time.Until(at)
		}
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				if errors.Is(ctx.Err(), context.DeadlineExceeded) {
					return fmt.Errorf("%s still not done after %v", loc, pollTimeout)
				}
				return ctx.Err()
			case <-t.C:
			}
		}
		done, err := check()
		if done || err != nil {
			return err
		}
		interval = min(interval*pollGrowth, pollMax)
	}
}

// retryAfterTransport is the CA client's transport. It keeps the
// Retry-After of the latest response, and the URL it came from, since
// acme.Client does not return headers from GetAuthorization, GetOrder or
// FinalizeOrder. The issuer sends one request at a time.
type retryAfterTransport struct {
	next http.RoundTripper

	mu  sync.Mutex
	url string
	at  time.Time // zero: the latest response had no valid Retry-After
}

// RoundTrip implements http.RoundTripper.
func (t *retryAfterTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	var at time.Time
	if resp != nil {
		now := time.Now()
		if d, ok := parseRetryAfter(resp.Header.Get("Retry-After"), now); ok {
			at = now.Add(d)
		}
	}
	t.mu.Lock()
	t.url, t.at = req.URL.String(), at
	t.mu.Unlock()
	return resp, err
}

// CloseIdleConnections closes the idle connections of the transport
// underneath, so that none outlives the host.
func (t *retryAfterTransport) CloseIdleConnections() {
	if c, ok := t.next.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// take returns the time named by the latest response's Retry-After if that
// response came from loc, and forgets it.
func (t *retryAfterTransport) take(loc string) (time.Time, bool) {
	loc = normalURL(loc)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.url != loc || t.at.IsZero() {
		return time.Time{}, false
	}
	at := t.at
	t.at = time.Time{}
	return at, true
}

// move re-labels a Retry-After from the URL from which it came to the URL
// it is for.
func (t *retryAfterTransport) move(from, to string) {
	from, to = normalURL(from), normalURL(to)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.url == from {
		t.url = to
	}
}

// normalURL is loc as a request's URL reads back, for comparisons.
func normalURL(loc string) string {
	if u, err := url.Parse(loc); err == nil {
		return u.String()
	}
	return loc
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
