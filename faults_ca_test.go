package autotls

// Fault tests of the CA: an outage (503s, or no answer), a CA that
// refuses "replaces", badNonce, failed validations, rate limits and
// Retry-After on polls. (DNS faults are in faults_dns_test.go.)

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mholt/acmez/v3/acme"
	"github.com/miekg/dns"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestFaultCARefusesReplaces: at renewal the order names the certificate it
// replaces (ARI). A CA that cannot find that certificate (Pebble answers 500
// for some serials; Let's Encrypt says alreadyReplaced when an earlier order
// named it) must not keep the host from renewing: the same attempt orders
// again without "replaces", and the renewal goes through with no warning.
func TestFaultCARefusesReplaces(t *testing.T) {
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodPost || r.URL.Path != "/order-plz" {
			return false
		}
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body)) // for the CA, if proxied
		if orderReplaces(t, body) == "" {
			return false
		}
		problem(w, http.StatusInternalServerError, acme.ProblemTypeNamespace+"serverInternal",
			"could not find an order for the given certificate: could not find order resulting in the given certificate serial number", "")
		return true
	})
	r := startProxiedRig(t, f, ca)
	served := r.waitLoaded(t)

	r.kick(t) // renewal due
	renewed := r.waitRenewed(t, served)
	if samePublicKey(renewed.leaf.PublicKey, served.leaf.PublicKey) {
		t.Error("the renewed certificate has the old one's key")
	}
	var with, without int
	for _, req := range ca.Requests() {
		if req.Method != http.MethodPost || req.Path != "/order-plz" {
			continue
		}
		if orderReplaces(t, req.Body) != "" {
			with++
		} else {
			without++
		}
	}
	// One order at issuance; at renewal the refused one (the ACME client
	// itself tries a 500 up to three times), then one without "replaces".
	if with == 0 || without != 2 {
		t.Errorf("orders naming the replaced certificate: %d, without: %d; want some, and 2", with, without)
	}
	if w := warnings(r); len(w) != 0 {
		t.Errorf("%d warnings, want none:\n%s", len(w), r.logs)
	}
	r.closeAndCheck(t, leaks)
}

// orderReplaces returns the "replaces" field of a new-order request's JWS
// body.
func orderReplaces(t *testing.T, raw []byte) string {
	t.Helper()
	var jws struct {
		Payload string `json:"payload"`
	}
	if err := json.Unmarshal(raw, &jws); err != nil {
		t.Errorf("a new-order request is not a JWS: %v", err)
		return ""
	}
	payload, err := base64.RawURLEncoding.DecodeString(jws.Payload)
	if err != nil {
		t.Errorf("a new-order payload is not base64url: %v", err)
		return ""
	}
	var order struct {
		Replaces string `json:"replaces"`
	}
	if err := json.Unmarshal(payload, &order); err != nil {
		t.Errorf("a new-order payload is not JSON: %v", err)
	}
	return order.Replaces
}

// TestFaultCA drives the CA into its failures: Pebble rejecting half the
// nonces (badNonce), an authorization that fails validation (the CA sees
// another TXT value than the host did), rate limiting (429 rateLimited, or
// the 503 of an overall request limit, with Retry-After as seconds and as
// an HTTP-date; Pebble has no rate limits, so the proxy answers for it),
// and Retry-After on authorization and order polls (Pebble's own).
func TestFaultCA(t *testing.T) {
	t.Run("badNonce at 50%", func(t *testing.T) {
		f := startForge(t, testforge.Config{NonceRejectPercent: 50})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		// One issuance sends about ten signed requests: all of them get
		// through one time in a thousand, so issue again until one nonce
		// was refused.
		for i := 0; ; i++ {
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(time.Hour))
			before := len(ca.Requests())
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
			r.waitLoaded(t)
			reqs := ca.Requests()[before:]
			bad := 0
			for _, q := range reqs {
				if q.Status == http.StatusBadRequest {
					bad++
				}
			}
			t.Logf("issued through %d CA requests, %d of them refused for their nonce (retried by the ACME client); %d attempts failed for the manager", len(reqs), bad, len(warnings(r)))
			r.close(t)
			if bad > 0 {
				break
			}
			if i == 2 {
				t.Fatal("Pebble rejected no nonce in three issuances: the fault did not happen")
			}
		}
		ca.Close()
		leaks()
	})

	t.Run("invalid authorization", func(t *testing.T) {
		f := startForge(t, testforge.Config{})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		// The host sees its TXT record; once it asks the CA to validate,
		// the CA is shown "not set yet" — for the first attempt only.
		var hide atomic.Bool
		var validations atomic.Int32
		f.SetDNSFault(func(q dns.Question) testforge.DNSFault { return testforge.DNSFault{HideTXT: hide.Load()} })
		defer f.SetDNSFault(nil)
		ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
			switch {
			case r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/chalZ/"):
				hide.Store(validations.Add(1) == 1)
			case r.Method == http.MethodPost && r.URL.Path == "/order-plz":
				hide.Store(false)
			}
			return false
		})
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(time.Hour))
		r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
		r.closers = append(r.closers, ca.Close)
		r.waitLoaded(t)

		ev := r.fails.last(t)
		var prob acme.Problem
		if !errors.As(ev.Err, &prob) {
			t.Fatalf("failure %v carries no ACME problem", ev.Err)
		}
		if validations.Load() != 2 {
			t.Errorf("%d validations, want 2 (one failed, one passed)", validations.Load())
		}
		// Let's Encrypt allows 5 failed validations per identifier per
		// account per hour (one more every 12 minutes).
		if w := r.retries(); len(w) == 0 || w[0] < validationFloor {
			t.Errorf("retried %v after a failed validation; want ≥ %v to stay within the CA's 5 failures per hour", w, validationFloor)
		}
		w := warnings(r)
		if len(w) != 1 {
			t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
		}
		t.Logf("the operator reads: %s", w[0].text)
		r.closeAndCheck(t, leaks)
	})

	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name   string
		status int
		typ    string
		form   string
	}{
		{"rate limited, seconds", http.StatusTooManyRequests, acme.ProblemTypeRateLimited, "seconds"},
		{"rate limited, date", http.StatusTooManyRequests, acme.ProblemTypeRateLimited, "date"},
		{"overall limit 503, seconds", http.StatusServiceUnavailable, acme.ProblemTypeNamespace + "serverInternal", "seconds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca := startCAProxy(t, f)
			leaks := leakCheck(t)
			const after = 3 * time.Hour
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(24 * time.Hour))
			type order struct {
				fake, real time.Time // when it arrived, on both clocks
				deadline   time.Time // real time its Retry-After named, if refused
			}
			var mu sync.Mutex
			var orders []order
			ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method != http.MethodPost || r.URL.Path != "/order-plz" {
					return false
				}
				mu.Lock()
				defer mu.Unlock()
				o := order{fake: clk.Now(), real: time.Now()}
				// Refuse the first attempt, with the ACME client's own
				// retries inside it (at the same manager time).
				if len(orders) > 0 && !o.fake.Equal(orders[0].fake) {
					orders = append(orders, o)
					return false
				}
				v := fmt.Sprint(int(after / time.Second))
				o.deadline = o.real.Add(after)
				if tc.form == "date" {
					// An HTTP-date has whole seconds: round up.
					o.deadline = o.real.Add(after).Truncate(time.Second).Add(time.Second)
					v = o.deadline.UTC().Format(http.TimeFormat)
				}
				orders = append(orders, o)
				problem(w, tc.status, tc.typ, "too many new orders recently: see https://letsencrypt.org/docs/rate-limits/", v)
				return true
			})
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
			r.closers = append(r.closers, ca.Close)
			r.waitLoaded(t)
			mu.Lock()
			defer mu.Unlock()
			refused, last := orders[:len(orders)-1], orders[len(orders)-1]
			// The manager read the Retry-After on its own clock when the
			// refusal arrived, and waited (on that clock) from then to the
			// next order. Counted from the refusal's real arrival, the
			// next order comes no sooner than the Retry-After named.
			waited := last.fake.Sub(refused[len(refused)-1].fake)
			if earliest := last.real.Add(waited); earliest.Before(refused[len(refused)-1].deadline) {
				t.Errorf("the manager waited %v after a Retry-After of %v: %v early", waited, after, refused[len(refused)-1].deadline.Sub(earliest))
			}
			t.Logf("new-order requests: %d refused within the first attempt (the ACME client's own retries), then 1 after %v", len(refused), waited.Round(time.Second))
			w := warnings(r)
			if len(w) != 1 {
				t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			r.closeAndCheck(t, leaks)
		})
	}

	t.Run("Retry-After on polls", func(t *testing.T) {
		f := startForge(t, testforge.Config{RetryAfterAuthz: 1, RetryAfterOrder: 1})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		// On the real clock: the CA's requests are timed on it.
		h := newHost(t, f, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
		waitCert(t, h, 30*time.Second)
		reqs := ca.Requests()
		checked := 0
		for i, q := range reqs {
			d, ok := parseRetryAfter(q.RetryAfter, q.Received)
			if !ok || d == 0 || strings.Contains(q.Path, "renewalInfo") {
				continue
			}
			notBefore := q.Received.Add(d)
			// The poll a Retry-After is for: the same URL, or the order
			// after its finalization.
			next := strings.Replace(q.Path, "/finalize-order/", "/my-order/", 1)
			for _, n := range reqs[i+1:] {
				if n.Path != next {
					continue
				}
				checked++
				if n.Received.Before(notBefore) {
					t.Errorf("%s polled %v after %s said to wait until %v", n.Path, n.Received.Sub(q.Received), q.Path, q.RetryAfter)
				}
				break
			}
		}
		if checked == 0 {
			for _, q := range reqs {
				t.Logf("%s %s %d %q", q.Method, q.Path, q.Status, q.RetryAfter)
			}
			t.Fatal("no poll followed a Retry-After: the fault did not happen")
		}
		t.Logf("%d polls followed a Retry-After, none early", checked)
		if err := h.Close(); err != nil {
			t.Fatal(err)
		}
		ca.Close()
		leaks()
	})
}

// TestFaultCAOutage: the CA answers every request with 503 and no
// Retry-After (as an ACME problem, or as a load balancer's page; from the
// first request, or from the first new order, once the account exists),
// for several attempts on the fake clock, then recovers. The whole outage
// gives exactly one warning, the manager's, naming the CA's URL and saying
// it is failing or unreachable (the ACME client's own retries stay at
// debug level); the attempts follow the transient backoff; the
// certificate comes once the CA is back. A CA that does not answer at all
// (its proxy closed) gives one warning saying it is unreachable.
func TestFaultCAOutage(t *testing.T) {
	f := startForge(t, testforge.Config{})
	const outage = 2 * time.Minute // five attempts at least
	for _, tc := range []struct {
		name string
		// from tells whether the outage has begun with request r.
		from func(r *http.Request) bool
		// answer is the CA's answer during the outage.
		answer func(w http.ResponseWriter)
	}{
		{"problem document", nil, func(w http.ResponseWriter) {
			problem(w, http.StatusServiceUnavailable, acme.ProblemTypeNamespace+"serverInternal", "the service is down for maintenance", "")
		}},
		{"load balancer page", nil, func(w http.ResponseWriter) {
			http.Error(w, "<html><body><h1>503 Service Unavailable</h1>No server is available to handle this request.</body></html>", http.StatusServiceUnavailable)
		}},
		{"problem document, from the first order", func(r *http.Request) bool {
			return r.Method == http.MethodPost && r.URL.Path == "/order-plz"
		}, func(w http.ResponseWriter) {
			problem(w, http.StatusServiceUnavailable, acme.ProblemTypeNamespace+"serverInternal", "the service is down for maintenance", "")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca := startCAProxy(t, f)
			leaks := leakCheck(t)
			var down, up atomic.Bool
			down.Store(tc.from == nil)
			ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
				if up.Load() {
					return false
				}
				if !down.Load() && !tc.from(r) {
					return false
				}
				down.Store(true)
				tc.answer(w)
				return true
			})
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(outage))
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
			r.closers = append(r.closers, ca.Close)
			clk.WaitParked(t, 30*time.Second)

			waits := r.retries()
			faulted := 0
			for _, q := range ca.Requests() {
				if q.Faulted {
					faulted++
				}
			}
			t.Logf("%v of outage: %d attempts, %d CA requests answered 503", outage, len(waits), faulted)
			if len(waits) < 3 {
				t.Fatalf("%d attempts in %v of outage, want several; log:\n%s", len(waits), outage, r.logs)
			}
			checkBackoff(t, waits)
			if r.m.cert.Load() != nil {
				t.Fatal("a certificate is served although the CA is down")
			}
			checkCAWarning(t, r, ca.URL, "failing", "unreachable")
			pingOverTCP(t, f, r.h)

			up.Store(true)
			clk.SetHorizon(clk.Now().Add(retryCap))
			r.waitLoaded(t)
			if w := warnings(r); len(w) != 1 {
				t.Errorf("%d warnings after the CA recovered, want still 1:\n%s", len(w), r.logs)
			}
			r.closeAndCheck(t, leaks)
		})
	}

	t.Run("unreachable", func(t *testing.T) {
		ca := startCAProxy(t, f)
		ca.Close() // nothing listens at its URL any more
		leaks := leakCheck(t)
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(outage))
		r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
		clk.WaitParked(t, 30*time.Second)
		waits := r.retries()
		t.Logf("%v without an answer from the CA: %d attempts", outage, len(waits))
		if len(waits) < 3 {
			t.Fatalf("%d attempts in %v, want several; log:\n%s", len(waits), outage, r.logs)
		}
		checkBackoff(t, waits)
		checkCAWarning(t, r, ca.URL, "unreachable")
		pingOverTCP(t, f, r.h)
		r.closeAndCheck(t, leaks)
	})
}

// checkCAWarning checks that r logged exactly one warning, the manager's,
// naming the CA at caURL and saying one of says.
func checkCAWarning(t *testing.T, r *faultRig, caURL string, says ...string) {
	t.Helper()
	w := warnings(r)
	if len(w) != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
	}
	t.Logf("the operator reads: %s", w[0].text)
	if _, ok := w[0].attrs["kind"]; !ok {
		t.Errorf("the warning is not the manager's account of a failed attempt: %s", w[0].text)
	}
	if !strings.Contains(w[0].msg, caURL) {
		t.Errorf("the warning's message does not name the CA (%s): %q", caURL, w[0].msg)
	}
	if !slices.ContainsFunc(says, func(s string) bool { return strings.Contains(w[0].msg, s) }) {
		t.Errorf("the warning's message does not say the CA is %s: %q", strings.Join(says, " or "), w[0].msg)
	}
}

// stallingCA is a reverse proxy in front of the forge's CA, over HTTP/2
// or HTTP/1.1, that holds every request matching stall until its client
// gives up on it. Unlike the forge's CAProxy, it lets the test close its
// own connections to the CA without closing the host's connections to it,
// so that a connection the host leaves open is found by the leak check
// rather than closed under it.
type stallingCA struct {
	url     string
	roots   *x509.CertPool
	up      *http.Transport
	stalled chan struct{} // receives when a request is being held
}

func startStallingCA(t *testing.T, f *testforge.Forge, http2 bool, stall func(*http.Request) bool) *stallingCA {
	t.Helper()
	target, err := url.Parse(f.CAURL)
	if err != nil {
		t.Fatal(err)
	}
	target.Path = ""
	up := http.DefaultTransport.(*http.Transport).Clone()
	up.Proxy = nil
	up.TLSClientConfig = &tls.Config{RootCAs: f.CARoots}
	s := &stallingCA{up: up, stalled: make(chan struct{}, 1)}
	release := make(chan struct{})
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host // the CA's URLs then name the proxy
		},
		Transport: up,
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !stall(r) {
			rp.ServeHTTP(w, r)
			return
		}
		// An HTTP/1.1 server notices that the client went away only once
		// the request's body has been read.
		_, _ = io.Copy(io.Discard, r.Body)
		select {
		case s.stalled <- struct{}{}:
		default:
		}
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	srv.EnableHTTP2 = http2
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	t.Cleanup(func() {
		close(release)
		srv.Close()
		up.CloseIdleConnections()
	})
	s.url = srv.URL + strings.TrimPrefix(f.CAURL, target.String())
	s.roots = x509.NewCertPool()
	s.roots.AddCert(srv.Certificate())
	return s
}

// TestCloseDuringCARequest: closing the host while a request to the CA is
// in flight (a new order during the first issuance, or the first ARI poll
// once the certificate is in use), over HTTP/2 and over HTTP/1.1, returns,
// and leaves no goroutine behind: in particular no read loop of a
// connection to the CA, which a connection pool keeps alive for 90 s if
// the request's cancellation leaves the connection open. Each case is
// repeated, since the cancellation races the closing of idle connections.
func TestCloseDuringCARequest(t *testing.T) {
	const reps = 15
	f := startForge(t, testforge.Config{})
	for _, place := range []struct {
		name  string
		stall func(*http.Request) bool
		edit  func(*manager)
	}{
		{"new order", func(r *http.Request) bool {
			return r.Method == http.MethodPost && r.URL.Path == "/order-plz"
		}, nil},
		{"renewal information", func(r *http.Request) bool {
			return r.Method == http.MethodGet && strings.Contains(r.URL.Path, "renewalInfo")
		}, func(m *manager) { m.ariFirstPoll = time.Millisecond }},
	} {
		for _, http2 := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s over %s", place.name, map[bool]string{true: "HTTP/2", false: "HTTP/1.1"}[http2]), func(t *testing.T) {
				ca := startStallingCA(t, f, http2, place.stall)
				for i := range reps {
					leaks := leakCheck(t)
					clk := newClockAtNow()
					clk.SetHorizon(clk.Now().Add(time.Minute))
					r := startRig(t, f, clk, nil, place.edit, WithStorage(storage.Memory()), WithCA(ca.url, ca.roots))
					select {
					case <-ca.stalled:
					case <-time.After(30 * time.Second):
						t.Fatalf("try %d: no %s request within 30 s; log:\n%s", i+1, place.name, r.logs)
					}
					closed := make(chan error, 1)
					go func() { closed <- r.h.Close() }()
					select {
					case err := <-closed:
						if err != nil {
							t.Errorf("try %d: closing the host: %v", i+1, err)
						}
					case <-time.After(30 * time.Second):
						t.Fatalf("try %d: host.Close did not return within 30 s with a %s request in flight", i+1, place.name)
					}
					for _, c := range r.closers {
						c()
					}
					ca.up.CloseIdleConnections() // the proxy's own, to the CA
					leaks()
					if t.Failed() {
						t.Fatalf("try %d of %d left goroutines behind", i+1, reps)
					}
				}
			})
		}
	}
}
