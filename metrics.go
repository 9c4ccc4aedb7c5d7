package autotls

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"

	"github.com/libp2p/go-libp2p"
	"github.com/prometheus/client_golang/prometheus"
)

// Prometheus metrics, registered with the host's registerer
// (libp2p.PrometheusRegisterer, prometheus.DefaultRegisterer unless set;
// none under libp2p.DisableMetrics). docs/operating.md lists them with
// alerts. The hosts of a process that share a registerer share one
// collector, as go-libp2p's own metrics do: counters add up, the state
// gauge counts hosts per state, and the expiry is the earliest of their
// certificates. No label holds a PeerID or an address.
const metricsNamespace = "autotls"

// metrics is the collector of one registerer.
type metrics struct {
	expiry, state *prometheus.Desc
	attempts      *prometheus.CounterVec
	broker, ca    *prometheus.CounterVec

	mu    sync.Mutex
	hosts map[*manager]struct{} // started and not yet stopped
}

func newMetrics() *metrics {
	return &metrics{
		expiry: prometheus.NewDesc(metricsNamespace+"_certificate_expiry_timestamp_seconds",
			"NotAfter of the certificate in use, in seconds since the Unix epoch (the earliest, if several hosts share the registerer); absent while none is in use.",
			nil, nil),
		state: prometheus.NewDesc(metricsNamespace+"_state",
			"1 for the current state of the certificate manager, 0 for the others (with several hosts: how many are in each state).",
			[]string{"state"}, nil),
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace,
			Name:      "issuance_attempts_total",
			Help:      "Attempts to obtain or renew a certificate (broker health checks before the first included), by result (success, failure) and failure kind (none on success).",
		}, []string{"result", "kind"}),
		broker: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace,
			Name:      "broker_requests_total",
			Help:      "HTTP requests to the registration broker, by operation (health, register) and outcome.",
		}, []string{"op", "outcome"}),
		ca: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace,
			Name:      "ca_requests_total",
			Help:      "HTTP requests to the ACME CA, by outcome.",
		}, []string{"outcome"}),
		hosts: map[*manager]struct{}{},
	}
}

// takeRegisterer keeps the registerer of the host's final libp2p
// configuration; attach registers the metrics with it.
func (m *manager) takeRegisterer(cfg *libp2p.Config) {
	if !cfg.DisableMetrics {
		m.promReg = cfg.PrometheusRegisterer
	}
}

// registerMetrics returns the collector registered with reg: a new one, or
// the one another host registered there before.
func registerMetrics(reg prometheus.Registerer) (*metrics, error) {
	c := newMetrics()
	err := reg.Register(c)
	if err == nil {
		return c, nil
	}
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if ex, ok := are.ExistingCollector.(*metrics); ok {
			return ex, nil
		}
	}
	return nil, fmt.Errorf("registering the autotls metrics: %w", err)
}

// Describe implements prometheus.Collector.
func (c *metrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.expiry
	ch <- c.state
	c.attempts.Describe(ch)
	c.broker.Describe(ch)
	c.ca.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *metrics) Collect(ch chan<- prometheus.Metric) {
	c.attempts.Collect(ch)
	c.broker.Collect(ch)
	c.ca.Collect(ch)

	c.mu.Lock()
	counts := make(map[State]int, len(states))
	var expiry float64
	for m := range c.hosts {
		m.status.mu.Lock()
		st, notAfter := m.status.s.State, m.status.s.NotAfter
		m.status.mu.Unlock()
		counts[st]++
		if t := float64(notAfter.UnixMilli()) / 1e3; !notAfter.IsZero() && (expiry == 0 || t < expiry) {
			expiry = t
		}
	}
	c.mu.Unlock()
	for _, s := range states {
		ch <- prometheus.MustNewConstMetric(c.state, prometheus.GaugeValue, float64(counts[s]), string(s))
	}
	if expiry != 0 {
		ch <- prometheus.MustNewConstMetric(c.expiry, prometheus.GaugeValue, expiry)
	}
}

// The methods below do nothing on a nil *metrics (metrics disabled).

// add counts m's host in the gauges, from its start.
func (c *metrics) add(m *manager) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hosts[m] = struct{}{}
}

// remove stops counting m's host, at its close.
func (c *metrics) remove(m *manager) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.hosts, m)
}

// attempt counts an attempt that failed with kind, or succeeded if kind
// is empty.
func (c *metrics) attempt(kind string) {
	if c == nil {
		return
	}
	if kind == "" {
		c.attempts.WithLabelValues("success", "none").Inc()
		return
	}
	c.attempts.WithLabelValues("failure", kind).Inc()
}

// brokerClient returns hc, or a copy of it (a new client if nil) whose
// requests are counted.
func (c *metrics) brokerClient(hc *http.Client) *http.Client {
	if c == nil {
		return hc
	}
	var cp http.Client
	if hc != nil {
		cp = *hc
	}
	cp.Transport = &meteredTransport{next: cp.Transport, count: func(req *http.Request, resp *http.Response, err error) {
		c.broker.WithLabelValues(brokerOp(req), requestOutcome(resp, err)).Inc()
	}}
	return &cp
}

// caTransport returns next wrapped so that its requests are counted.
func (c *metrics) caTransport(next http.RoundTripper) http.RoundTripper {
	if c == nil {
		return next
	}
	return &meteredTransport{next: next, count: func(_ *http.Request, resp *http.Response, err error) {
		c.ca.WithLabelValues(requestOutcome(resp, err)).Inc()
	}}
}

// brokerOp names the broker operation of req.
func brokerOp(req *http.Request) string {
	switch {
	case strings.HasSuffix(req.URL.Path, healthPath):
		return "health"
	case strings.HasSuffix(req.URL.Path, registerPath):
		return "register"
	}
	return "other"
}

// requestOutcome sorts a response into a few outcomes: ok (2xx),
// auth_challenge (401 opening a PeerID-auth handshake, part of every
// registration), redirect (3xx), rate_limited (429), client_error (other
// 4xx), server_error (5xx), error (no response: refused, timed out,
// cancelled).
func requestOutcome(resp *http.Response, err error) string {
	switch {
	case err != nil || resp == nil:
		return "error"
	case resp.StatusCode == http.StatusUnauthorized && strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "libp2p-PeerID"):
		return "auth_challenge"
	case resp.StatusCode == http.StatusTooManyRequests:
		return "rate_limited"
	case resp.StatusCode < 300:
		return "ok"
	case resp.StatusCode < 400:
		return "redirect"
	case resp.StatusCode < 500:
		return "client_error"
	}
	return "server_error"
}

// meteredTransport counts each request it sends with its outcome.
type meteredTransport struct {
	next  http.RoundTripper // nil means http.DefaultTransport
	count func(*http.Request, *http.Response, error)
}

// RoundTrip implements http.RoundTripper.
func (t *meteredTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.transport().RoundTrip(req)
	t.count(req, resp, err)
	return resp, err
}

// CloseIdleConnections closes the idle connections of the transport
// underneath, so that none outlives the host.
func (t *meteredTransport) CloseIdleConnections() {
	if ci, ok := t.transport().(interface{ CloseIdleConnections() }); ok {
		ci.CloseIdleConnections()
	}
}

func (t *meteredTransport) transport() http.RoundTripper {
	if t.next == nil {
		return http.DefaultTransport
	}
	return t.next
}
