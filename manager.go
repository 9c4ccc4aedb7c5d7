package autotls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	"github.com/mholt/acmez/v3/acme"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/zap"
)

// Retry bounds for failed issuance. Each failure waits longer, with jitter
// so that many nodes failing together do not return together; a broker's or
// CA's Retry-After is always honoured in full.
const (
	defaultRetryBase = time.Minute
	defaultRetryMax  = 6 * time.Hour
	// unreachableMin: the broker could not dial us back. Retrying quickly
	// cannot help until the network changes.
	unreachableMin = 15 * time.Minute
	// validationRetryMin: the CA could not validate the challenge. Let's
	// Encrypt allows five failed validations per identifier and account
	// per hour (one more every 12 minutes); a node that keeps failing
	// stays under that limit, jitter included.
	validationRetryMin = 15 * time.Minute
	// storageLoadTimeout bounds the synchronous storage read on start.
	storageLoadTimeout = 5 * time.Second
)

// servedCert is the certificate in use and its parsed leaf.
type servedCert struct {
	tls  *tls.Certificate
	leaf *x509.Certificate
}

// manager owns the certificate of one host: it loads, obtains, renews and
// serves it, and rewrites the host's addresses while it is valid.
type manager struct {
	cfg *config
	log *slog.Logger

	// Set by attach, before the host starts.
	host   host.Host
	sw     *swarm.Swarm
	id     peer.ID
	name   string // *.<b36>.<forge>
	domain string // <b36>.<forge>
	broker *brokerClient
	issuer *acmeIssuer
	magic  *certmagic.Config
	cache  *certmagic.Cache

	emLoaded, emExpired, emFailed event.Emitter

	// userWSS are forge listen addresses the user listed; nil means one per
	// TCP listener.
	userWSS []ma.Multiaddr

	cert  atomic.Pointer[servedCert]
	reach reachability
	ari   ariState

	listenMu  sync.Mutex
	wssAddrs  []ma.Multiaddr // to listen on while a certificate is valid
	listening bool

	retryBase, retryMax time.Duration
	// txtWait bounds the wait for the DNS-01 TXT record to be visible;
	// zero means txtWaitTimeout. Tests shorten it.
	txtWait time.Duration
	// idle are HTTP transports of ours whose idle connections close with
	// the host.
	idle []interface{ CloseIdleConnections() }
	// kick makes the run loop issue or renew at once instead of waiting.
	kick chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	start  time.Time
}

func newManager(c *config) *manager {
	m := &manager{cfg: c, log: c.logger, retryBase: defaultRetryBase, retryMax: defaultRetryMax, kick: make(chan struct{}, 1)}
	if c.onManager != nil {
		c.onManager(m)
	}
	return m
}

// attach binds the manager to its host; it runs while the host is built.
func (m *manager) attach(h host.Host, sw *swarm.Swarm, key crypto.PrivKey) error {
	m.host, m.sw, m.id = h, sw, h.ID()
	m.name = certName(m.id, m.cfg.forgeDomain)
	m.domain = certDomain(m.id, m.cfg.forgeDomain)
	m.log = m.log.With("peer", m.id.String())

	hc := m.cfg.httpClient
	if hc == nil {
		// Our own transport, so that its idle connections can be closed
		// with the host rather than linger in http.DefaultTransport.
		tr := http.DefaultTransport.(*http.Transport).Clone()
		m.idle = append(m.idle, tr)
		hc = &http.Client{Transport: tr, Timeout: 90 * time.Second}
	}
	broker, err := newBrokerClient(brokerConfig{
		Endpoint:    m.cfg.registrationEndpoint,
		Key:         key,
		HTTPClient:  hc,
		UserAgent:   m.cfg.userAgent,
		AccessToken: m.cfg.accessToken,
		Now:         m.cfg.clock.Now,
	})
	if err != nil {
		return err
	}
	m.broker = broker
	solver := &dns01Solver{broker: broker, resolver: m.cfg.resolver, addrs: m.brokerAddrs, waitTimeout: m.txtWait}
	m.issuer = newACMEIssuer(issuerConfig{
		caURL:        m.cfg.caURL,
		roots:        m.cfg.caRoots,
		userAgent:    broker.userAgent,
		email:        m.cfg.email,
		profile:      m.cfg.profile,
		pollInterval: m.cfg.acmePollInterval,
		storage:      m.cfg.storage,
		name:         m.name,
		solver:       solver,
		log:          quietLogger(m.log.With("component", "acme")),
		current:      m.currentLeaf,
		now:          m.cfg.clock.Now,
	})
	m.idle = append(m.idle, m.issuer.client.HTTPClient)

	bus := h.EventBus()
	if m.emLoaded, err = bus.Emitter(new(EvtCertificateLoaded), eventbus.Stateful); err != nil {
		return fmt.Errorf("creating the certificate event emitter: %w", err)
	}
	if m.emExpired, err = bus.Emitter(new(EvtCertificateExpired)); err != nil {
		return fmt.Errorf("creating the expiry event emitter: %w", err)
	}
	if m.emFailed, err = bus.Emitter(new(EvtIssuanceFailed), eventbus.Stateful); err != nil {
		return fmt.Errorf("creating the failure event emitter: %w", err)
	}
	return nil
}

// newCertmagic builds certmagic's cache and config explicitly: no package
// defaults. Renewal is scheduled by the manager (so that every goroutine is
// joined on close and every retry honours Retry-After), hence the cache's
// own maintenance is set never to come due.
func (m *manager) newCertmagic() {
	zl := zap.New(newSlogCore(m.log.With("component", "certmagic")))
	var magic *certmagic.Config
	m.cache = certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert:   func(certmagic.Certificate) (*certmagic.Config, error) { return magic, nil },
		RenewCheckInterval: 100 * 365 * 24 * time.Hour,
		OCSPCheckInterval:  100 * 365 * 24 * time.Hour,
		Logger:             zl,
	})
	magic = certmagic.New(m.cache, certmagic.Config{
		Storage:    m.cfg.storage,
		Issuers:    []certmagic.Issuer{m.issuer},
		KeySource:  m.issuer, // keeps the key until the certificate is stored (pending.go)
		Logger:     zl,
		OCSP:       certmagic.OCSPConfig{DisableStapling: true},
		DisableARI: true,
	})
	m.magic = magic
}

// onStart runs when the host starts, after its listeners are open. A valid
// stored certificate is served before it returns, so the host's first
// addresses already include the browser-dialable ones.
func (m *manager) onStart(ctx context.Context) error {
	m.start = m.cfg.clock.Now()
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.newCertmagic()
	m.planListeners()

	sub, err := m.host.EventBus().Subscribe([]any{new(event.EvtHostReachableAddrsChanged), new(event.EvtLocalReachabilityChanged)})
	if err != nil {
		return fmt.Errorf("autotls: subscribing to reachability events: %w", err)
	}
	m.wg.Add(1)
	go m.watchReachability(sub)

	loadCtx, cancel := context.WithTimeout(ctx, storageLoadTimeout)
	stored, loadErr := m.loadStored(loadCtx)
	cancel()
	if stored != nil {
		m.serve(stored, FromStorage)
	}
	m.wg.Add(1)
	go m.run(loadErr)
	return nil
}

// onStop runs on host.Close: it cancels every wait and joins every
// goroutine the manager started, certmagic's included.
func (m *manager) onStop(context.Context) error {
	if m.cancel != nil {
		m.cancel()
	}
	m.wg.Wait()
	if m.cache != nil {
		m.cache.Stop()
	}
	for _, t := range m.idle {
		t.CloseIdleConnections()
	}
	return errors.Join(closeEmitter(m.emLoaded), closeEmitter(m.emExpired), closeEmitter(m.emFailed))
}

func closeEmitter(e event.Emitter) error {
	if e == nil {
		return nil
	}
	return e.Close()
}

// run is the manager's one long-lived goroutine: gates before the first
// issuance, then issuance and renewal with backoff, until the host closes.
func (m *manager) run(loadErr error) {
	defer m.wg.Done()
	ctx := m.ctx
	if m.cert.Load() == nil {
		var exp *expiredError
		var bad *unusableError
		switch {
		case loadErr == nil, errors.Is(loadErr, fs.ErrNotExist), errors.As(loadErr, &exp):
			// Nothing stored, or expired (said by loadStored).
		case errors.As(loadErr, &bad):
			m.log.Warn("stored certificate not usable; a new one will be requested", "err", loadErr)
		default:
			m.log.Warn("stored certificate could not be read; retrying, without requesting a new one while the stored one may be valid", "err", loadErr)
		}
		if !m.waitGates(ctx) {
			return
		}
	}

	var attempt int
	var retryAt time.Time
	var lastErr string
	for {
		due, poll := m.cfg.clock.Now(), false
		cur := m.cert.Load()
		if cur != nil {
			due, poll = m.nextStep(cur.leaf)
		}
		if retryAt.After(due) {
			due, poll = retryAt, false
		}
		if !m.waitUntil(ctx, due) {
			return
		}
		if poll && m.cert.Load() == cur && !m.cfg.clock.Now().Before(due) {
			m.pollARI(ctx, cur.leaf)
			continue
		}
		renewal := m.cert.Load() != nil
		err := m.issue(ctx, renewal)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			attempt, retryAt, lastErr = 0, time.Time{}, ""
			continue
		}
		attempt++
		delay := m.retryDelay(attempt, err)
		retryAt = m.cfg.clock.Now().Add(delay)
		level := slog.LevelWarn
		if key := failureKey(err); key == lastErr {
			level = slog.LevelDebug // the same failure again: said once already
		} else {
			lastErr = key
		}
		m.log.Log(ctx, level, describeFailure(err), "renewal", renewal, "attempt", attempt, "retry_in", delay.Round(time.Second), "err", err)
		_ = m.emFailed.Emit(EvtIssuanceFailed{Err: err, Attempt: attempt, NextRetry: retryAt, Renewal: renewal})
	}
}

// issue obtains (or renews) the certificate and serves it.
func (m *manager) issue(ctx context.Context, renewal bool) error {
	var err error
	if renewal {
		err = m.magic.RenewCertSync(ctx, m.name, true)
	} else {
		err = m.magic.ObtainCertSync(ctx, m.name)
	}
	if err != nil {
		return err
	}
	// certmagic obtains nothing if storage holds a certificate already
	// (one it could not read, say): what is loaded may not be new.
	c, err := m.loadStored(ctx)
	if err != nil {
		return fmt.Errorf("loading the certificate from storage: %w", err)
	}
	m.issuer.forgetPending(ctx)
	if cur := m.cert.Load(); renewal && cur != nil && c.leaf.Equal(cur.leaf) {
		return errors.New("renewal stored no new certificate")
	}
	src := Obtained
	if renewal {
		src = Renewed
	}
	m.serve(c, src)
	return nil
}

// loadStored reads the certificate and key from storage and checks them:
// the name must be exactly ours, the key must match, and it must be valid
// now. An expired certificate is deleted (a CA will not renew what it no
// longer considers current). One that cannot be ours (corrupt, for another
// name, or with a key that does not match) is moved aside, so that the
// next issuance is not skipped for it: certmagic obtains nothing while a
// certificate, key and metadata exist in storage. A certificate that could
// not be read is left alone: it may be valid once the storage is back.
func (m *manager) loadStored(ctx context.Context) (*servedCert, error) {
	ik := m.issuer.IssuerKey()
	certPEM, err := m.cfg.storage.Load(ctx, certmagic.StorageKeys.SiteCert(ik, m.name))
	if err != nil {
		return nil, fmt.Errorf("reading the certificate from storage: %w", err)
	}
	keyPEM, err := m.cfg.storage.Load(ctx, certmagic.StorageKeys.SitePrivateKey(ik, m.name))
	if err != nil {
		return nil, fmt.Errorf("reading the certificate key from storage: %w", err)
	}
	c, err := m.checkCert(certPEM, keyPEM)
	if err != nil {
		var exp *expiredError
		var bad *unusableError
		switch {
		case errors.As(err, &exp):
			m.log.Info("stored certificate expired; deleting it so that a fresh one is issued", "not_after", exp.notAfter)
			m.deleteStored(ctx)
		case errors.As(err, &bad):
			if aerr := m.moveAside(ctx); aerr != nil {
				return nil, fmt.Errorf("%w (moving it aside failed: %w)", err, aerr)
			}
			return nil, fmt.Errorf("%w; moved it aside (%s) so that a new one is issued", err, asideSuffix)
		}
		return nil, err
	}
	return c, nil
}

// unusableError: the stored certificate can never be ours, whatever the
// time: corrupt, for another name, or not matching its key.
type unusableError struct{ err error }

func (e *unusableError) Error() string { return e.err.Error() }
func (e *unusableError) Unwrap() error { return e.err }

// asideSuffix is appended to the storage keys of an unusable certificate,
// key and metadata when they are moved aside.
const asideSuffix = ".unusable"

// moveAside copies the certificate, key and metadata under keys ending in
// asideSuffix, for the operator to look at, then deletes the originals.
// Nothing is deleted unless its copy was stored.
func (m *manager) moveAside(ctx context.Context) error {
	ik := m.issuer.IssuerKey()
	for _, k := range []string{
		certmagic.StorageKeys.SiteCert(ik, m.name),
		certmagic.StorageKeys.SitePrivateKey(ik, m.name),
		certmagic.StorageKeys.SiteMeta(ik, m.name),
	} {
		v, err := m.cfg.storage.Load(ctx, k)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if err := m.cfg.storage.Store(ctx, k+asideSuffix, v); err != nil {
			return err
		}
		if err := m.cfg.storage.Delete(ctx, k); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

type expiredError struct{ notAfter time.Time }

func (e *expiredError) Error() string {
	return "certificate expired at " + e.notAfter.Format(time.RFC3339)
}

// checkCert parses a PEM certificate chain and key and verifies that they
// belong together, name exactly our wildcard, and are valid now.
func (m *manager) checkCert(certPEM, keyPEM []byte) (*servedCert, error) {
	tc, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, &unusableError{fmt.Errorf("certificate and key in storage do not form a pair: %w", err)}
	}
	leaf := tc.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(tc.Certificate[0]); err != nil {
			return nil, &unusableError{fmt.Errorf("parsing the stored certificate: %w", err)}
		}
		tc.Leaf = leaf
	}
	if len(leaf.DNSNames) != 1 || !strings.EqualFold(leaf.DNSNames[0], m.name) {
		return nil, &unusableError{fmt.Errorf("stored certificate is for %v, not %s", leaf.DNSNames, m.name)}
	}
	now := m.cfg.clock.Now()
	if now.After(leaf.NotAfter) {
		return nil, &expiredError{leaf.NotAfter}
	}
	if now.Before(leaf.NotBefore.Add(-time.Hour)) {
		return nil, fmt.Errorf("stored certificate is not valid before %s", leaf.NotBefore.Format(time.RFC3339))
	}
	return &servedCert{tls: &tc, leaf: leaf}, nil
}

func (m *manager) deleteStored(ctx context.Context) {
	ik := m.issuer.IssuerKey()
	for _, k := range []string{
		certmagic.StorageKeys.SiteCert(ik, m.name),
		certmagic.StorageKeys.SitePrivateKey(ik, m.name),
		certmagic.StorageKeys.SiteMeta(ik, m.name),
	} {
		if err := m.cfg.storage.Delete(ctx, k); err != nil && !errors.Is(err, fs.ErrNotExist) {
			m.log.Warn("could not delete the expired certificate from storage", "key", k, "err", err)
		}
	}
}

// serve makes c the certificate in use, opens the WSS listeners if they
// are not open, and refreshes the host's addresses.
func (m *manager) serve(c *servedCert, src CertSource) {
	m.cert.Store(c)
	m.log.Info("certificate loaded", "source", string(src), "name", m.name, "not_after", c.leaf.NotAfter.Format(time.RFC3339))
	m.openListeners()
	_ = m.emLoaded.Emit(EvtCertificateLoaded{
		Names:     append([]string(nil), c.leaf.DNSNames...),
		NotBefore: c.leaf.NotBefore,
		NotAfter:  c.leaf.NotAfter,
		Source:    src,
	})
}

// expire withdraws a certificate that lapsed without a replacement.
func (m *manager) expire(c *servedCert) {
	if !m.cert.CompareAndSwap(c, nil) {
		return
	}
	m.log.Warn("certificate expired without renewal; browser addresses withdrawn until a new one is issued", "not_after", c.leaf.NotAfter.Format(time.RFC3339))
	m.closeListeners()
	_ = m.emExpired.Emit(EvtCertificateExpired{Names: append([]string(nil), c.leaf.DNSNames...), NotAfter: c.leaf.NotAfter})
}

func (m *manager) currentLeaf() *x509.Certificate {
	if c := m.cert.Load(); c != nil {
		return c.leaf
	}
	return nil
}

// renewAt is when the certificate should be renewed: with a third of its
// lifetime left (half, for lifetimes under ten days), as Let's Encrypt
// recommends when the CA gives no renewal window (ARI, see renewal.go).
func (m *manager) renewAt(leaf *x509.Certificate) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	left := life / 3
	if life < 10*24*time.Hour {
		left = life / 2
	}
	return leaf.NotAfter.Add(-left)
}

// waitUntil sleeps until t, withdrawing the certificate if it expires in
// the meantime. It returns false when the host is closing.
func (m *manager) waitUntil(ctx context.Context, t time.Time) bool {
	for {
		now := m.cfg.clock.Now()
		if !now.Before(t) {
			return true
		}
		wake := t
		cur := m.cert.Load()
		if cur != nil && cur.leaf.NotAfter.Before(wake) {
			if !now.Before(cur.leaf.NotAfter) {
				m.expire(cur)
				continue
			}
			wake = cur.leaf.NotAfter
		}
		c, stop := m.cfg.clock.NewTimer(wake.Sub(now))
		select {
		case <-ctx.Done():
			stop()
			return false
		case <-m.kick:
			stop()
			return true
		case <-c:
		}
	}
}

// sleep waits d on the manager's clock; it returns false when the host is
// closing.
func (m *manager) sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	c, stop := m.cfg.clock.NewTimer(d)
	defer stop()
	select {
	case <-ctx.Done():
		return false
	case <-c:
		return true
	}
}

// retryDelay is the wait before attempt+1: exponential from retryBase to
// retryMax with jitter in [d/2, d], never less than a Retry-After (the
// broker's, or the CA's when the CA refused), longer when retrying cannot
// help soon or would cost a failed validation.
func (m *manager) retryDelay(attempt int, err error) time.Duration {
	d := m.retryBase
	for i := 1; i < attempt && d < m.retryMax; i++ {
		d *= 2
	}
	d = min(d, m.retryMax)
	var be *BrokerError
	if errors.As(err, &be) {
		switch {
		case be.Unreachable():
			d = max(d, min(unreachableMin, m.retryMax))
		case !be.Temporary():
			d = m.retryMax
		}
	}
	d = d/2 + rand.N(d/2+1)
	if be != nil && be.RetryAfter > d {
		d = be.RetryAfter
	}
	var prob acme.Problem
	if errors.As(err, &prob) {
		if validationFailed(prob) {
			d = max(d, validationRetryMin)
		}
		// A rate limit (429), an overloaded CA (503) or any other refusal
		// may carry a Retry-After: the issuer's client keeps the last one.
		d = max(d, m.caRetryAfter())
	}
	return d
}

// validationFailed reports whether prob is the CA's verdict on a challenge
// it tried to validate (the issuer attaches the invalid authorization).
func validationFailed(prob acme.Problem) bool {
	_, ok := prob.Resource.(acme.Authorization)
	return ok
}

// caRetryAfter is what remains of the Retry-After of the CA's latest
// response, or 0.
func (m *manager) caRetryAfter() time.Duration {
	t := m.issuer.retryAfter
	if t == nil {
		return 0
	}
	t.mu.Lock()
	at := t.at
	t.mu.Unlock()
	if at.IsZero() {
		return 0
	}
	return max(time.Until(at), 0)
}

// failureKey tells failures apart for logging: a failure with the same key
// as the one before is logged at debug level only. Error texts carry what
// changes from one attempt to the next (order URLs, what the last DNS
// lookup found), so the known causes are keyed by what they are.
func failureKey(err error) string {
	var be *BrokerError
	var txt *txtNotVisibleError
	var prob acme.Problem
	switch {
	case errors.As(err, &be):
		return fmt.Sprintf("broker: status %d, unreachable %t", be.StatusCode, be.Unreachable())
	case errors.As(err, &txt):
		return "TXT record not visible"
	case errors.As(err, &prob):
		return fmt.Sprintf("CA: %s, validation %t", prob.Type, validationFailed(prob))
	}
	return err.Error()
}

// describeFailure is the operator-facing sentence for a failed attempt.
func describeFailure(err error) string {
	var be *BrokerError
	if errors.As(err, &be) {
		switch {
		case be.Unreachable():
			return "certificate request failed: the broker could not dial this node back; check that its TCP port is reachable from the internet (port forwarding, UPnP, firewall)"
		case be.StatusCode == 403:
			return "certificate request refused by the broker (403): check the access token (WithAccessToken, FORGE_ACCESS_TOKEN) or whether this address is denylisted"
		case be.StatusCode == 0:
			return "certificate request failed: the broker is unreachable"
		case be.Temporary():
			return "certificate request failed: the broker is temporarily unavailable"
		default:
			return "certificate request refused by the broker"
		}
	}
	var prob acme.Problem
	if errors.As(err, &prob) {
		switch {
		case validationFailed(prob):
			return "certificate request failed: the CA could not validate the DNS-01 challenge that this node saw published; retrying later, within the CA's limit on failed validations"
		case prob.Type == acme.ProblemTypeRateLimited:
			return "certificate request refused by the CA: rate limited; retrying after the time it gave"
		}
		return "certificate request refused by the CA"
	}
	return "certificate request failed"
}

// waitGates blocks until a first certificate request can succeed and be
// used: the registration delay has passed, the host is publicly reachable
// over TCP (unless private addresses are allowed), and the broker is
// healthy. It returns false when the host is closing.
func (m *manager) waitGates(ctx context.Context) bool {
	if d := m.cfg.registrationDelay - m.cfg.clock.Now().Sub(m.start); d > 0 {
		m.log.Info("waiting for the registration delay before requesting a certificate", "delay", d.Round(time.Second))
		if !m.sleep(ctx, d) {
			return false
		}
	}
	if !m.cfg.allowPrivate && !m.waitReachable(ctx) {
		return false
	}
	for attempt := 1; ; attempt++ {
		err := m.broker.health(ctx)
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		delay := m.retryDelay(attempt, err)
		level := slog.LevelWarn
		if attempt > 1 {
			level = slog.LevelDebug
		}
		m.log.Log(ctx, level, "broker health check failed; waiting before requesting a certificate", "endpoint", m.cfg.registrationEndpoint, "retry_in", delay.Round(time.Second), "err", err)
		_ = m.emFailed.Emit(EvtIssuanceFailed{Err: err, Attempt: attempt, NextRetry: m.cfg.clock.Now().Add(delay)})
		if !m.sleep(ctx, delay) {
			return false
		}
	}
}
