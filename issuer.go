package autotls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"time"

	"github.com/mholt/acmez/v3"
	"github.com/mholt/acmez/v3/acme"
)

// issuer runs ACME orders for one name over acmez's low-level client, the
// way autocert runs its own: every wait is the CA's (polls that honour
// Retry-After, measured on the manager's clock), nothing retries behind
// the run loop's back (a retried validation spends the CA's failed
// validation budget), ARI's "replaces" is only sent for a certificate
// that is still valid, and an order can be taken up after a crash.
type issuer struct {
	client  *acme.Client
	solver  *dns01Solver
	store   *pairStore
	email   string
	profile string
	log     *slog.Logger
	clock   clock
	ra      *retryAfterTransport

	account *acme.Account // cached; used by the run goroutine only
}

// Polling of authorizations and orders: a CA often decides within
// milliseconds (Pebble on loopback: under 1 ms), so the first poll comes
// after pollFirst, then the interval triples up to pollMax (against a slow
// CA, about as many polls as a fixed 250 ms interval). A Retry-After from
// the CA replaces the interval exactly.
const (
	pollFirst   = time.Millisecond
	pollGrowth  = 3
	pollMax     = time.Second
	pollTimeout = 5 * time.Minute // per authorization or order, as acmez's default
)

func newIssuer(caURL string, roots *x509.CertPool, userAgent, email, profile string, solver *dns01Solver, store *pairStore, clk clock,
	dial func(ctx context.Context, network, addr string) (net.Conn, error), log *slog.Logger) *issuer {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	tr.Proxy = nil
	tr.DialContext = dial
	ra := &retryAfterTransport{next: tr, clock: clk}
	return &issuer{
		client: &acme.Client{
			Directory:  caURL,
			HTTPClient: &http.Client{Transport: ra, Timeout: 60 * time.Second},
			UserAgent:  userAgent,
			// The issuer polls; FinalizeOrder must not. A negative
			// timeout makes it return at once with the order as the CA
			// left it (processing, perhaps).
			PollTimeout:  -1,
			PollInterval: pollMax,
			// acmez says its retries of a CA's 5xx and badNonce at warning
			// level; the run loop says what an operator needs, once.
			Logger: debugLogger(log),
		},
		solver:  solver,
		store:   store,
		email:   email,
		profile: profile,
		log:     log,
		clock:   clk,
		ra:      ra,
	}
}

// obtain runs one ACME order for csr and returns the issued chain. po
// holds the certificate key; if it names an order for that key, the order
// is taken up where the CA has it. Just before the CSR is sent, po is
// stored with the order's URL: from then on a certificate may exist that
// only this key can use. replaces, if not nil, is named in the order (ARI).
// Every error from the CA's side is a *caError.
func (i *issuer) obtain(ctx context.Context, csr *x509.CertificateRequest, po *pendingOrder, replaces *x509.Certificate) (acme.Certificate, error) {
	if err := i.checkProfile(ctx); err != nil {
		return acme.Certificate{}, i.caError(err)
	}
	for attempt := 0; ; attempt++ {
		account, err := i.getAccount(ctx)
		if err == nil {
			var chain acme.Certificate
			chain, err = i.order(ctx, account, csr, po, replaces)
			if err == nil {
				return chain, nil
			}
		}
		var prob acme.Problem
		if attempt == 0 && errors.As(err, &prob) && prob.Type == acme.ProblemTypeAccountDoesNotExist {
			// The CA forgot the account (reset, or a private CA
			// restarted): make a new one and try once more.
			i.log.Info("ACME account unknown to the CA; creating a new one", "ca", i.client.Directory)
			if err = i.forgetAccount(ctx); err == nil {
				continue
			}
		}
		return acme.Certificate{}, i.caError(err)
	}
}

// caError marks err as the CA's, with the Retry-After of its last response.
func (i *issuer) caError(err error) *caError {
	ce := &caError{ca: i.client.Directory, err: err}
	if at, ok := i.ra.latest(); ok {
		ce.retryAt = at
	}
	return ce
}

// order runs one ACME order (RFC 8555 §7.1): it creates the order, or
// takes up the pending one, solves its authorizations, finalizes it and
// downloads the chain.
func (i *issuer) order(ctx context.Context, account acme.Account, csr *x509.CertificateRequest, po *pendingOrder, replaces *x509.Certificate) (acme.Certificate, error) {
	params, err := acmez.OrderParametersFromCSR(account, csr)
	if err != nil {
		return acme.Certificate{}, fmt.Errorf("preparing the order: %w", err)
	}
	order, resumed := i.resumeOrder(ctx, account, po.Order, params.Identifiers)
	if !resumed {
		if order, err = i.newOrder(ctx, account, params.Identifiers, replaces); err != nil {
			return acme.Certificate{}, err
		}
	}
	switch order.Status {
	case acme.StatusValid:
	case acme.StatusProcessing:
		if order, err = i.pollOrder(ctx, account, order); err != nil {
			return acme.Certificate{}, err
		}
	default: // pending, or ready if every authorization is valid already
		if err := i.authorize(ctx, account, order); err != nil {
			return acme.Certificate{}, err
		}
		if po.Order != order.Location {
			po.Order = order.Location
			if err := i.store.storePending(ctx, *po); err != nil {
				// Issuance does not depend on it; only a crash before the
				// certificate is stored would then cost a new one.
				i.log.Debug("storing the pending order", "err", err)
			}
		}
		if order, err = i.finalize(ctx, account, order, csr.Raw); err != nil {
			return acme.Certificate{}, err
		}
	}
	chains, err := i.client.GetCertificateChain(ctx, account, order.Certificate)
	if err != nil {
		return acme.Certificate{}, fmt.Errorf("downloading the certificate %s: %w", order.Certificate, err)
	}
	if len(chains) == 0 {
		return acme.Certificate{}, errors.New("the CA returned no certificate")
	}
	return chains[0], nil
}

// resumeOrder returns the order at loc as the CA has it now, if it can
// still give a certificate for ids (pending, ready, processing or valid).
func (i *issuer) resumeOrder(ctx context.Context, account acme.Account, loc string, ids []acme.Identifier) (acme.Order, bool) {
	if loc == "" {
		return acme.Order{}, false
	}
	order, err := i.client.GetOrder(ctx, account, acme.Order{Location: loc})
	if err != nil {
		i.log.Debug("the pending order cannot be read; ordering anew", "order", loc, "err", err)
		return acme.Order{}, false
	}
	if !sameIdentifiers(order.Identifiers, ids) {
		return acme.Order{}, false
	}
	switch order.Status {
	case acme.StatusPending, acme.StatusReady, acme.StatusProcessing, acme.StatusValid:
		i.log.Info("taking up the pending order", "order", loc, "status", order.Status)
		return order, true
	}
	i.log.Debug("the pending order is over; ordering anew", "order", loc, "status", order.Status)
	return acme.Order{}, false
}

func sameIdentifiers(a, b []acme.Identifier) bool {
	keys := func(ids []acme.Identifier) []string {
		out := make([]string, len(ids))
		for n, id := range ids {
			out[n] = id.Type + ":" + id.Value
		}
		slices.Sort(out)
		return out
	}
	return slices.Equal(keys(a), keys(b))
}

// newOrder creates an order for ids, naming replaces, if it is still
// valid, in "replaces" (ARI).
func (i *issuer) newOrder(ctx context.Context, account acme.Account, ids []acme.Identifier, replaces *x509.Certificate) (acme.Order, error) {
	order := acme.Order{Identifiers: ids, Profile: i.profile}
	if replaces != nil && i.clock.Now().Before(replaces.NotAfter) {
		var err error
		if order.Replaces, err = acme.ARIUniqueIdentifier(replaces); err != nil {
			return acme.Order{}, fmt.Errorf("naming the certificate replaced: %w", err)
		}
	}
	created, err := i.client.NewOrder(ctx, account, order)
	if err != nil && order.Replaces != "" && refusedReplaces(err) {
		// "replaces" only earns the renewal ARI's treatment; it must never
		// stand between the host and its renewal. An earlier order may have
		// named the certificate already (alreadyReplaced), or the CA may not
		// find the certificate (Pebble answers 500 for some serials).
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
func (i *issuer) authorize(ctx context.Context, account acme.Account, order acme.Order) (err error) {
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
		if err := i.solver.Wait(ctx, p.chal); err != nil {
			return fmt.Errorf("waiting for the challenge for %s: %w", p.authz.IdentifierValue(), err)
		}
		chal, err := i.client.InitiateChallenge(ctx, account, p.chal)
		if err != nil {
			return fmt.Errorf("asking the CA to validate %s: %w", p.authz.IdentifierValue(), err)
		}
		// A Retry-After on the challenge's response is for the first poll
		// of its authorization. (The transport keeps one: with several
		// authorizations, only the last one's would be kept. Our orders
		// have one.)
		i.ra.move(p.chal.URL, p.authz.Location)
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
func (i *issuer) pollAuthorization(ctx context.Context, account acme.Account, authz acme.Authorization) (acme.Authorization, error) {
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
func (i *issuer) finalize(ctx context.Context, account acme.Account, order acme.Order, csrDER []byte) (acme.Order, error) {
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
	i.ra.move(order.Finalize, finalized.Location)
	return i.pollOrder(ctx, account, finalized)
}

// pollOrder polls a processing order until the certificate is issued.
func (i *issuer) pollOrder(ctx context.Context, account acme.Account, order acme.Order) (acme.Order, error) {
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
func (i *issuer) poll(ctx context.Context, loc string, check func() (done bool, err error)) error {
	deadline := i.clock.Now().Add(pollTimeout)
	interval := pollFirst
	for {
		wait := interval
		if at, ok := i.ra.take(loc); ok {
			wait = at.Sub(i.clock.Now())
		}
		if i.clock.Now().Add(wait).After(deadline) {
			return fmt.Errorf("%s still not done after %v", loc, pollTimeout)
		}
		if err := sleep(ctx, i.clock, wait); err != nil {
			return err
		}
		done, err := check()
		if done || err != nil {
			return err
		}
		interval = min(interval*pollGrowth, pollMax)
	}
}
