package autotls

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
)

// startLoadTimeout bounds the storage read at start, which the host's
// start waits for.
const startLoadTimeout = 5 * time.Second

// manager owns the certificate of one host: it loads, obtains, renews and
// serves it, and rewrites the host's addresses while it is valid. One
// goroutine, run, owns the issuance state; what handshakes and the address
// factory read is the atomic cert, and the reachability watcher shares
// reach with them.
type manager struct {
	cfg   *config
	log   *slog.Logger
	clock clock

	// Set by attach, before the host starts.
	host   host.Host
	sw     *swarm.Swarm
	id     peer.ID
	name   string // *.<b36>.<forge>
	domain string // <b36>.<forge>
	broker *brokerClient
	issuer *issuer
	store  *pairStore

	emLoaded, emExpired, emFailed event.Emitter
	emReach                       event.Emitter // EvtReachabilityChanged

	// userWSS are forge listen addresses the user listed; nil means one per
	// TCP listener.
	userWSS []ma.Multiaddr

	cert   atomic.Pointer[servedCert]
	reach  reachability
	listen listeners // the run goroutine's, and onStart's before it

	// ariFirstPoll bounds the delay of the first ARI request for a
	// certificate (ariFirstPollMax; tests shorten it).
	ariFirstPoll time.Duration
	// kick makes the run loop renew at once instead of waiting (tests).
	kick chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	start  time.Time
	// conns are the connections of our HTTP transports, closed with the
	// host.
	conns conns
}

func newManager(c *config) *manager {
	m := &manager{cfg: c, log: c.logger, clock: c.clock, ariFirstPoll: ariFirstPollMax, kick: make(chan struct{}, 1)}
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
		// Our own transport, so that its connections close with the host
		// rather than linger in http.DefaultTransport.
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.DialContext = m.conns.dial
		hc = &http.Client{Transport: tr, Timeout: 90 * time.Second}
	}
	broker, err := newBrokerClient(brokerConfig{
		Endpoint:    m.cfg.registrationEndpoint,
		Key:         key,
		HTTPClient:  hc,
		UserAgent:   m.cfg.userAgent,
		AccessToken: m.cfg.accessToken,
		Now:         m.clock.Now,
	})
	if err != nil {
		return err
	}
	m.broker = broker
	m.store = &pairStore{s: m.cfg.storage, issuerKey: issuerKey(m.cfg.caURL), name: m.name, log: m.log}
	solver := &dns01Solver{broker: broker, resolver: m.cfg.resolver, addrs: m.brokerRequestAddrs, clock: m.clock}
	m.issuer = newIssuer(m.cfg.caURL, m.cfg.caRoots, broker.userAgent, m.cfg.email, m.cfg.profile,
		solver, m.store, m.clock, m.conns.dial, m.log.With("component", "acme"))

	bus := h.EventBus()
	if m.emLoaded, err = bus.Emitter(new(EvtCertificateLoaded), eventbus.Stateful); err != nil {
		return fmt.Errorf("creating the certificate event emitter: %w", err)
	}
	if m.emExpired, err = bus.Emitter(new(EvtCertificateExpired)); err != nil {
		return fmt.Errorf("creating the expiry event emitter: %w", err)
	}
	if m.emFailed, err = bus.Emitter(new(EvtIssuanceFailed)); err != nil {
		return fmt.Errorf("creating the failure event emitter: %w", err)
	}
	if m.emReach, err = bus.Emitter(new(EvtReachabilityChanged), eventbus.Stateful); err != nil {
		return fmt.Errorf("creating the reachability event emitter: %w", err)
	}
	return nil
}

// onStart runs when the host starts, after its listeners are open. A valid
// stored certificate is served before it returns, so the host's first
// addresses already include the browser-dialable ones.
func (m *manager) onStart(ctx context.Context) error {
	m.start = m.clock.Now()
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.planListeners()

	if err := m.startGate(); err != nil {
		return err
	}

	loadCtx, cancel := context.WithTimeout(ctx, startLoadTimeout)
	stored, loadErr := m.store.load(loadCtx, m.clock.Now())
	cancel()
	if stored != nil {
		m.serve(stored, FromStorage)
	}
	m.wg.Add(1)
	go m.run(loadErr)
	return nil
}

// onStop runs on host.Close: it cancels every wait, joins every goroutine
// the manager started, then closes its connections.
func (m *manager) onStop(context.Context) error {
	if m.cancel != nil {
		m.cancel()
	}
	m.wg.Wait()
	m.broker.close()
	m.conns.closeAll()
	return errors.Join(m.emLoaded.Close(), m.emExpired.Close(), m.emFailed.Close(), m.emReach.Close())
}

// runState is the run loop's memory of failures.
type runState struct {
	attempt int       // consecutive failures
	retryAt time.Time // no attempt before
	lastKey string    // classify key of the failure said last
	last    failureKind
	ari     ariState
}

// run is the manager's one long-lived goroutine: gates before the first
// issuance, then issuance and renewal with backoff, until the host closes.
func (m *manager) run(loadErr error) {
	defer m.wg.Done()
	ctx := m.ctx
	var st runState
	if m.cert.Load() == nil {
		if loadErr != nil && !errors.Is(loadErr, fs.ErrNotExist) {
			f := classify(loadErr, m.clock.Now())
			m.log.Warn(f.sentence+"; no new certificate is requested while the stored one may be valid", "kind", string(f.kind), "err", loadErr)
			st.lastKey = f.key
		}
		if !m.waitGates(ctx, &st) {
			return
		}
	}
	for {
		due, poll := m.clock.Now(), false
		cur := m.cert.Load()
		if cur != nil {
			due, poll = st.ari.next(cur.leaf, m.clock.Now(), m.ariFirstPoll)
		}
		if st.retryAt.After(due) {
			due, poll = st.retryAt, false
		}
		if !m.waitUntil(ctx, due) {
			return
		}
		if poll && m.cert.Load() == cur && !m.clock.Now().Before(due) {
			m.pollARI(ctx, &st.ari, cur.leaf)
			continue
		}
		// Every attempt passes the reachability gate, a renewal as the
		// first issuance; a renewal checks the broker's health too.
		if !m.waitReachable(ctx) {
			return
		}
		err := m.attempt(ctx, cur != nil || st.attempt > 0 && st.last == kindBroker)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			st.attempt, st.retryAt, st.lastKey, st.last = 0, time.Time{}, "", ""
			continue
		}
		st.retryAt = m.clock.Now().Add(m.fail(ctx, &st, err))
	}
}

// attempt obtains or renews the certificate. When checkBroker is set (a
// renewal, or the broker failed last time) the broker's health is checked
// first: an order
// the broker cannot serve would cost the CA an order and an authorization
// for nothing.
func (m *manager) attempt(ctx context.Context, checkBroker bool) error {
	if checkBroker {
		if err := m.broker.health(ctx); err != nil {
			return err
		}
	}
	return m.obtain(ctx)
}

// fail says a failed attempt: one warning per distinct failure (a repeat
// at debug level), and an [EvtIssuanceFailed]. It returns the wait before
// the next attempt.
func (m *manager) fail(ctx context.Context, st *runState, err error) time.Duration {
	now := m.clock.Now()
	st.attempt++
	f := classify(err, now)
	delay := retryDelay(f, st.attempt, now)
	level := slog.LevelWarn
	if f.key == st.lastKey {
		level = slog.LevelDebug
	}
	st.lastKey, st.last = f.key, f.kind
	renewal := m.cert.Load() != nil
	m.log.Log(ctx, level, f.sentence, "kind", string(f.kind), "renewal", renewal, "attempt", st.attempt, "retry_in", delay.Round(time.Millisecond), "err", err)
	_ = m.emFailed.Emit(EvtIssuanceFailed{Err: err, Attempt: st.attempt, NextRetry: now.Add(delay), Renewal: renewal})
	return delay
}

// waitGates blocks until a first certificate request can succeed and be
// used: the registration delay has passed, the host is publicly reachable
// over TCP (unless private addresses are allowed), and the broker is
// healthy. It returns false when the host is closing.
func (m *manager) waitGates(ctx context.Context, st *runState) bool {
	if d := m.cfg.registrationDelay - m.clock.Now().Sub(m.start); d > 0 {
		m.log.Info("waiting for the registration delay before requesting a certificate", "delay", d.Round(time.Second))
		if sleep(ctx, m.clock, d) != nil {
			return false
		}
	}
	if !m.waitReachable(ctx) {
		return false
	}
	for {
		err := m.broker.health(ctx)
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		if sleep(ctx, m.clock, m.fail(ctx, st, err)) != nil {
			return false
		}
	}
}

// waitUntil sleeps until t, withdrawing the certificate if it expires in
// the meantime. It returns false when the host is closing.
func (m *manager) waitUntil(ctx context.Context, t time.Time) bool {
	for {
		now := m.clock.Now()
		if !now.Before(t) {
			return true
		}
		wake := t
		if cur := m.cert.Load(); cur != nil && cur.leaf.NotAfter.Before(wake) {
			if !now.Before(cur.leaf.NotAfter) {
				m.expire(cur)
				continue
			}
			wake = cur.leaf.NotAfter
		}
		c, stop := m.clock.NewTimer(wake.Sub(now))
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
