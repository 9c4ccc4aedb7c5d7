package autotls

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// scrape fetches url as Prometheus does and returns each autotls series
// as name{label="value",...} (labels sorted) → value.
func scrape(t testing.TB, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parsing the metrics of %s: %v", url, err)
	}
	out := map[string]float64{}
	for name, fam := range fams {
		if !strings.HasPrefix(name, "autotls_") {
			continue
		}
		for _, m := range fam.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			slices.Sort(labels)
			key := name
			if len(labels) > 0 {
				key += "{" + strings.Join(labels, ",") + "}"
			}
			switch {
			case m.GetGauge() != nil:
				out[key] = m.GetGauge().GetValue()
			case m.GetCounter() != nil:
				out[key] = m.GetCounter().GetValue()
			}
		}
	}
	return out
}

// stateSeries checks that autotls_state has one series per state, and
// returns those that are not 0.
func stateSeries(t testing.TB, got map[string]float64) map[State]float64 {
	t.Helper()
	out := map[State]float64{}
	for _, s := range states {
		v, ok := got[fmt.Sprintf("autotls_state{state=%q}", s)]
		if !ok {
			t.Errorf("no autotls_state series for %s", s)
		}
		if v != 0 {
			out[s] = v
		}
	}
	return out
}

// TestMetricsScrape: the metrics of hosts built with
// libp2p.PrometheusRegisterer, scraped over HTTP from a loopback listener,
// match the certificate each serves: its expiry is the NotAfter a TLS
// handshake gets, the state is valid, one successful attempt, the broker
// and CA requests counted. A second host on the same registerer does not
// panic and is counted too; closing it takes it out of the gauges and
// leaves the counters.
func TestMetricsScrape(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	reg := prometheus.NewRegistry()
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	url := srv.URL + "/metrics"
	opts := []libp2p.Option{libp2p.PrometheusRegisterer(reg)}

	h1 := newHost(t, f, opts, WithStorage(storage.Memory()))
	waitCert(t, h1, 30*time.Second)
	notAfter1 := servedNotAfter(t, h1, f)
	got := scrape(t, url)
	if v := got["autotls_certificate_expiry_timestamp_seconds"]; v != float64(notAfter1.Unix()) {
		t.Errorf("autotls_certificate_expiry_timestamp_seconds = %v, the served certificate's NotAfter is %d (%v)", v, notAfter1.Unix(), notAfter1)
	}
	if s := stateSeries(t, got); len(s) != 1 || s[StateValid] != 1 {
		t.Errorf("autotls_state: %v, want valid 1 and the others 0", s)
	}
	for series, want := range map[string]float64{
		`autotls_issuance_attempts_total{kind="none",result="success"}`: 1,
		`autotls_broker_requests_total{op="health",outcome="ok"}`:       1,
		`autotls_broker_requests_total{op="register",outcome="ok"}`:     1,
	} {
		if got[series] != want {
			t.Errorf("%s = %v, want %v", series, got[series], want)
		}
	}
	if got[`autotls_ca_requests_total{outcome="ok"}`] < 5 {
		t.Errorf("autotls_ca_requests_total{outcome=\"ok\"} = %v for a whole ACME order", got[`autotls_ca_requests_total{outcome="ok"}`])
	}
	var keys []string
	for k, v := range got {
		keys = append(keys, fmt.Sprintf("%s %v", k, v))
		if strings.Contains(k, h1.ID().String()) || strings.Contains(k, "127.0.0.1") {
			t.Errorf("a series names the peer or an address: %s", k)
		}
	}
	slices.Sort(keys)
	t.Logf("scraped:\n%s", strings.Join(keys, "\n"))

	// A second host on the same registerer.
	h2 := newHost(t, f, opts, WithStorage(storage.Memory()))
	waitCert(t, h2, 30*time.Second)
	notAfter2 := servedNotAfter(t, h2, f)
	got = scrape(t, url)
	if s := stateSeries(t, got); len(s) != 1 || s[StateValid] != 2 {
		t.Errorf("autotls_state with two valid hosts: %v", s)
	}
	if v, want := got["autotls_certificate_expiry_timestamp_seconds"], float64(min(notAfter1.Unix(), notAfter2.Unix())); v != want {
		t.Errorf("autotls_certificate_expiry_timestamp_seconds = %v, want the earlier of the two, %v", v, want)
	}
	if v := got[`autotls_issuance_attempts_total{kind="none",result="success"}`]; v != 2 {
		t.Errorf("successful attempts of two hosts: %v", v)
	}
	if err := h2.Close(); err != nil {
		t.Fatal(err)
	}
	got = scrape(t, url)
	if s := stateSeries(t, got); len(s) != 1 || s[StateValid] != 1 {
		t.Errorf("autotls_state after one of two hosts closed: %v", s)
	}
	if v := got[`autotls_issuance_attempts_total{kind="none",result="success"}`]; v != 2 {
		t.Errorf("successful attempts after a host closed: %v, want 2 still", v)
	}
	if err := h1.Close(); err != nil {
		t.Fatal(err)
	}
	got = scrape(t, url)
	if _, ok := got["autotls_certificate_expiry_timestamp_seconds"]; ok || len(stateSeries(t, got)) != 0 {
		t.Errorf("with no host running: %v", got)
	}
	srv.Close()
	leaks()
}

// TestMetricsFailure: failed attempts are counted by kind, and the
// broker's refusals by outcome, scraped over HTTP.
func TestMetricsFailure(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != registerPath {
			return false
		}
		w.Header().Set("Retry-After", "3600")
		http.Error(w, "slow down", http.StatusTooManyRequests)
		return true
	})
	defer f.SetBrokerFault(nil)
	reg := prometheus.NewRegistry()
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute)) // the retry an hour later parks
	r := startRig(t, f, clk, []libp2p.Option{libp2p.PrometheusRegisterer(reg)}, nil, WithStorage(storage.Memory()))
	clk.WaitParked(t, 30*time.Second)
	got := scrape(t, srv.URL)
	for series, want := range map[string]float64{
		`autotls_issuance_attempts_total{kind="broker",result="failure"}`:     1,
		`autotls_broker_requests_total{op="register",outcome="rate_limited"}`: 1,
		`autotls_state{state="failed"}`:                                       1,
	} {
		if got[series] != want {
			t.Errorf("%s = %v, want %v", series, got[series], want)
		}
	}
	if _, ok := got[`autotls_issuance_attempts_total{kind="none",result="success"}`]; ok {
		t.Error("a success counted for a failed attempt")
	}
	srv.Close()
	r.closeAndCheck(t, leaks)
}

// TestMetricsDisabled: under libp2p.DisableMetrics no collector is
// registered (the manager has none to register) and the host works.
func TestMetricsDisabled(t *testing.T) {
	f := startForge(t, testforge.Config{})
	var m *manager
	h := newHost(t, f, []libp2p.Option{libp2p.DisableMetrics()}, WithStorage(storage.Memory()), withManager(func(mm *manager) { m = mm }))
	waitCert(t, h, 30*time.Second)
	if m.metrics != nil || m.promReg != nil {
		t.Error("metrics registered under libp2p.DisableMetrics")
	}
}

// TestRequestOutcome: the outcome label of each kind of answer.
func TestRequestOutcome(t *testing.T) {
	challenge := http.Header{"Www-Authenticate": {`libp2p-PeerID challenge-client="x", public-key="y", opaque="z"`}}
	for _, tc := range []struct {
		name string
		resp *http.Response
		err  error
		want string
	}{
		{"200", &http.Response{StatusCode: 200}, nil, "ok"},
		{"204", &http.Response{StatusCode: 204}, nil, "ok"},
		{"PeerID challenge", &http.Response{StatusCode: 401, Header: challenge}, nil, "auth_challenge"},
		{"other 401", &http.Response{StatusCode: 401, Header: http.Header{}}, nil, "client_error"},
		{"307", &http.Response{StatusCode: 307}, nil, "redirect"},
		{"429", &http.Response{StatusCode: 429}, nil, "rate_limited"},
		{"400", &http.Response{StatusCode: 400}, nil, "client_error"},
		{"503", &http.Response{StatusCode: 503}, nil, "server_error"},
		{"refused", nil, errors.New("connection refused"), "error"},
	} {
		if got := requestOutcome(tc.resp, tc.err); got != tc.want {
			t.Errorf("%s: outcome %q, want %q", tc.name, got, tc.want)
		}
	}
}
