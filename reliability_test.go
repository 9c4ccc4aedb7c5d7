package autotls

// A simulated day of each fault, measured: what it costs the broker, the
// CA and DNS, what the operator reads, and how long the host takes to
// recover once the fault is cleared. docs/reliability.md holds the table
// this test logs.

import (
	"crypto/x509"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/mholt/acmez/v3/acme"
	"github.com/miekg/dns"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// dayEnv is what a fault of TestReliabilityDay acts on: its own forge and
// CA proxy, and the host's settings, which a case's setup may change
// before the host starts.
type dayEnv struct {
	f      *testforge.Forge
	ca     *testforge.CAProxy
	clk    *fakeClock
	broker *brokerCounter

	// The CA the host uses: the proxy, unless a case puts something in
	// front of it.
	caURL   string
	caRoots *x509.CertPool
	// More options for the host, and what to close after it.
	libp2pOpts []libp2p.Option
	opts       []Opt
	closers    []func()
	// What a case's setup made for its fault to act on.
	deadAddr atomic.Bool // announce a dead address only
	gate     *caGate     // in front of the CA proxy
	storeDir string      // the storage directory
}

// dayCase is one fault of TestReliabilityDay.
type dayCase struct {
	name string
	// setup, if set, shapes the host before it starts.
	setup func(t *testing.T, e *dayEnv)
	// fault starts the fault and returns what clears it. It runs before
	// the host starts, or, at renewal, once the first certificate is
	// served.
	fault   func(t *testing.T, e *dayEnv) (clear func())
	renewal bool

	// The policy's bounds. checkWaits checks the waits between attempts.
	checkWaits func(t *testing.T, waits []time.Duration)
	maxBroker  int // broker requests in the day; 0: not bounded here
	// warnings is the number of warnings over the day if it is not the
	// one the policy wants: a known deviation, said in the case.
	warnings int
	noCA     bool // no CA request at all in the day
	// noValidation: the CA is never asked to validate a challenge.
	noValidation bool
	// recover bounds the time from clearing the fault to the certificate
	// being served; bound says it for the table.
	recover time.Duration
	bound   string
}

// maxAttemptsPerDay is the retry policy's bound on the failed attempts in
// a day of a transient fault (retry.go; TestRetryPolicyBounds). A fault
// met in the registration costs the broker one request per attempt, plus
// the health check before the first certificate and the first leg of the
// PeerID-auth handshake.
const maxAttemptsPerDay = 20

// dayRow is what a day of one fault measured.
type dayRow struct {
	attempts, broker, ca, dns, warnings int
	recovery                            time.Duration
}

// TestReliabilityDay runs each fault for a simulated day on the fake
// clock, at the production retry policy, counts what it cost (failed
// attempts, requests the host sent the broker, requests the CA received,
// queries the forge's DNS received, warnings logged), then clears the
// fault and measures the simulated time until the certificate is served.
// That time runs from the end of the day to the end of the wait the host
// was in when the fault was cleared, plus the attempt that succeeds: the
// policy's bound on it is the longest wait the policy allows at that
// point. It asserts the policy's bounds and logs one markdown row per
// fault, and the whole table at the end (docs/reliability.md).
func TestReliabilityDay(t *testing.T) {
	const (
		brokerRA = 2 * time.Hour
		caRA     = 3 * time.Hour
		// slack is the simulated time the successful attempt itself
		// takes (its polls and lookups) on top of the wait before it.
		slack = time.Minute
	)
	capBound := "≤ 6h: the wait at the cap is [3h, 6h]"
	cases := []dayCase{
		{
			name: "broker 503 on health",
			fault: func(t *testing.T, e *dayEnv) func() {
				e.f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
					if r.URL.Path != healthPath {
						return false
					}
					http.Error(w, "upstream connect error or disconnect/reset before headers", http.StatusServiceUnavailable)
					return true
				})
				return func() { e.f.SetBrokerFault(nil) }
			},
			checkWaits: checkBackoff, maxBroker: maxAttemptsPerDay, noCA: true,
			recover: retryCap, bound: capBound,
		},
		{
			name: "broker connection refused",
			fault: func(t *testing.T, e *dayEnv) func() {
				if err := e.f.BrokerDown(); err != nil {
					t.Fatal(err)
				}
				return func() {
					if err := e.f.BrokerUp(); err != nil {
						t.Fatal(err)
					}
				}
			},
			checkWaits: checkBackoff, maxBroker: maxAttemptsPerDay, noCA: true,
			recover: retryCap, bound: capBound,
		},
		{
			// Each request hangs until the client gives up: after 100 ms
			// of real time here, standing for the production timeouts
			// (15 s for health), which the fake clock does not see.
			name: "broker hang",
			fault: func(t *testing.T, e *dayEnv) func() {
				e.broker.timeout.Store(int64(100 * time.Millisecond))
				e.f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
					<-r.Context().Done()
					return true
				})
				return func() {
					e.f.SetBrokerFault(nil)
					e.broker.timeout.Store(0)
				}
			},
			checkWaits: checkBackoff, maxBroker: maxAttemptsPerDay, noCA: true,
			recover: retryCap, bound: capBound,
		},
		{
			name: "broker 429, Retry-After 2h",
			fault: func(t *testing.T, e *dayEnv) func() {
				e.f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
					w.Header().Set("Retry-After", fmt.Sprint(int(brokerRA/time.Second)))
					http.Error(w, "slow down", http.StatusTooManyRequests)
					return true
				})
				return func() { e.f.SetBrokerFault(nil) }
			},
			checkWaits: retryAfterWaits(brokerRA), maxBroker: maxAttemptsPerDay, noCA: true,
			recover: brokerRA + brokerRA/10, bound: "≤ 2h12m: Retry-After + ≤ 10 %",
		},
		{
			// A denylisted address, as the public broker answers it
			// (protocol §2.4 step 9); the health check passes.
			name: "broker 403",
			fault: func(t *testing.T, e *dayEnv) func() {
				e.f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
					if r.URL.Path != registerPath {
						return false
					}
					http.Error(w, "403 Forbidden: client IP 127.0.0.1 blocked by spamhaus-drop", http.StatusForbidden)
					return true
				})
				return func() { e.f.SetBrokerFault(nil) }
			},
			checkWaits: permanentWaits, maxBroker: maxAttemptsPerDay,
			recover: retryCap, bound: "≤ 6h: a refusal waits [5h24m, 6h]",
		},
		{
			// The broker's real dial-back fails: the host announces a
			// port nothing listens on.
			name: "failed dial-back",
			setup: func(t *testing.T, e *dayEnv) {
				dead := deadTCPAddr(t)
				e.libp2pOpts = append(e.libp2pOpts, libp2p.AddrsFactory(func(in []ma.Multiaddr) []ma.Multiaddr {
					if e.deadAddr.Load() {
						return []ma.Multiaddr{dead}
					}
					return in
				}))
			},
			fault: func(t *testing.T, e *dayEnv) func() {
				e.deadAddr.Store(true)
				return func() { e.deadAddr.Store(false) }
			},
			checkWaits: floorWaits(unreachableFloor), maxBroker: maxAttemptsPerDay + 2,
			recover: retryCap, bound: capBound + "; ≥ 15m apart",
		},
		{
			name: "TXT never visible",
			fault: func(t *testing.T, e *dayEnv) func() {
				e.f.SetDNSFault(func(dns.Question) testforge.DNSFault { return testforge.DNSFault{HideTXT: true} })
				return func() { e.f.SetDNSFault(nil) }
			},
			checkWaits: checkBackoff, maxBroker: maxAttemptsPerDay + 2, noValidation: true,
			recover: retryCap, bound: capBound,
		},
		{
			// An overloaded CA: every request gets a 503 problem, with no
			// Retry-After.
			name: "CA 503 without Retry-After",
			fault: func(t *testing.T, e *dayEnv) func() {
				e.ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
					problem(w, http.StatusServiceUnavailable, acme.ProblemTypeServerInternal, "the service is down for maintenance", "")
					return true
				})
				return func() { e.ca.SetFault(nil) }
			},
			checkWaits: checkBackoff,
			recover:    retryCap, bound: capBound,
		},
		{
			// Every connection to the CA is closed before a byte is
			// answered.
			name:  "CA unreachable",
			setup: func(t *testing.T, e *dayEnv) { startCAGate(t, e) },
			fault: func(t *testing.T, e *dayEnv) func() {
				e.gate.shut.Store(true)
				return func() { e.gate.shut.Store(false) }
			},
			checkWaits: checkBackoff,
			recover:    retryCap, bound: capBound,
		},
		{
			name: "CA rate limit, Retry-After 3h",
			fault: func(t *testing.T, e *dayEnv) func() {
				e.ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
					if r.Method != http.MethodPost || r.URL.Path != "/order-plz" {
						return false
					}
					problem(w, http.StatusTooManyRequests, acme.ProblemTypeRateLimited,
						"too many new orders recently: see https://letsencrypt.org/docs/rate-limits/", fmt.Sprint(int(caRA/time.Second)))
					return true
				})
				return func() { e.ca.SetFault(nil) }
			},
			checkWaits: retryAfterWaits(caRA),
			recover:    caRA + caRA/10, bound: "≤ 3h18m: Retry-After + ≤ 10 %",
		},
		{
			// The host sees its TXT record; the CA, asked to validate it,
			// is shown "not set yet" (as TestFaultCA, for every attempt).
			name: "invalid authorization",
			fault: func(t *testing.T, e *dayEnv) func() {
				var hide atomic.Bool
				e.f.SetDNSFault(func(dns.Question) testforge.DNSFault { return testforge.DNSFault{HideTXT: hide.Load()} })
				e.ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
					switch {
					case r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/chalZ/"):
						hide.Store(true)
					case r.Method == http.MethodPost && r.URL.Path == "/order-plz":
						hide.Store(false)
					}
					return false
				})
				return func() {
					e.ca.SetFault(nil)
					e.f.SetDNSFault(nil)
				}
			},
			checkWaits: floorWaits(validationFloor), maxBroker: maxAttemptsPerDay + 2,
			recover: retryCap, bound: capBound + "; ≥ 15m apart",
		},
		{
			// The storage directory is replaced by a file: every read and
			// write fails, for root too.
			name: "storage unwritable",
			setup: func(t *testing.T, e *dayEnv) {
				dir := filepath.Join(t.TempDir(), "store")
				st, err := storage.Dir(dir)
				if err != nil {
					t.Fatal(err)
				}
				e.opts = append(e.opts, WithStorage(st))
				e.storeDir = dir
			},
			fault: func(t *testing.T, e *dayEnv) func() {
				return replaceDirWithFile(t, e.storeDir)
			},
			warnings:   1,
			checkWaits: checkBackoff, noCA: true,
			recover: retryCap, bound: capBound,
		},
		{
			// The CA's renewal information (ARI) says "renew now" (its
			// window in the past, as before a revocation), and the broker
			// refuses connections, as TestFaultBrokerOutageDay.
			name:    "broker connection refused at renewal",
			renewal: true,
			fault: func(t *testing.T, e *dayEnv) func() {
				clk := e.clk
				e.ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
					if !strings.Contains(r.URL.Path, "renewalInfo") {
						return false
					}
					now := clk.Now()
					w.Header().Set("Content-Type", "application/json")
					w.Header().Set("Retry-After", fmt.Sprint(int((6 * time.Hour).Seconds())))
					fmt.Fprintf(w, `{"suggestedWindow":{"start":%q,"end":%q}}`,
						now.Add(-2*time.Hour).UTC().Format(time.RFC3339), now.Add(-time.Hour).UTC().Format(time.RFC3339))
					return true
				})
				if err := e.f.BrokerDown(); err != nil {
					t.Fatal(err)
				}
				return func() {
					if err := e.f.BrokerUp(); err != nil {
						t.Fatal(err)
					}
					e.ca.SetFault(nil)
				}
			},
			checkWaits: checkBackoff, maxBroker: maxAttemptsPerDay,
			recover: retryCap, bound: capBound,
		},
	}

	rows := make([]string, len(cases))
	leaks := leakCheck(t)
	t.Run("faults", func(t *testing.T) {
		for i, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				got := runDay(t, tc, slack)
				rows[i] = fmt.Sprintf("| %s | %d | %d | %d | %d | %d | %s | %s |", tc.name, got.attempts, got.broker, got.ca, got.dns, got.warnings,
					fmtSimulated(got.recovery), tc.bound)
				t.Log(rows[i])
			})
		}
	})
	leaks()
	t.Logf("a simulated day of each fault, then the time to recover once it is cleared:\n\n"+
		"| fault | attempts/day | broker req/day | CA req/day | DNS queries/day | warnings | time to recover (simulated) | policy bound |\n"+
		"|---|---|---|---|---|---|---|---|\n%s", strings.Join(rows, "\n"))
}

// runDay runs one fault of TestReliabilityDay for a simulated day, checks
// the policy's bounds, clears the fault and measures the recovery.
func runDay(t *testing.T, tc dayCase, slack time.Duration) dayRow {
	const day = 24 * time.Hour
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	e := &dayEnv{f: f, ca: ca, clk: newClockAtNow(), broker: &brokerCounter{next: tr}, caURL: ca.URL, caRoots: ca.Roots}
	e.closers = append(e.closers, tr.CloseIdleConnections)
	if tc.setup != nil {
		tc.setup(t, e)
	}
	clk := e.clk
	served := &serveTimes{clk: clk}
	opts := append([]Opt{
		WithStorage(storage.Memory()),
		WithCA(e.caURL, e.caRoots),
		WithHTTPClient(&http.Client{Transport: e.broker, Timeout: 90 * time.Second}),
	}, e.opts...)

	var clear func()
	start := clk.Now()
	if tc.renewal {
		// Hold the clock before the first renewal-information poll.
		clk.SetHorizon(start.Add(time.Minute))
	} else {
		clear = tc.fault(t, e)
		clk.SetHorizon(start.Add(day))
	}
	r := startRig(t, f, clk, e.libp2pOpts, served.hook, opts...)
	r.closers = append(r.closers, e.closers...)
	defer r.close(t)

	var inUse *servedCert
	if tc.renewal {
		inUse = r.waitLoaded(t)
		clk.WaitParked(t, 30*time.Second)
		forgetValidAuthz(t, r, ca)
		clear = tc.fault(t, e)
		start = clk.Now()
	}
	type counts struct{ attempts, broker, ca, dns, warnings, fails int }
	snap := func() counts {
		c := counts{
			attempts: len(r.retries()),
			broker:   int(e.broker.n.Load()),
			ca:       len(ca.Requests()),
			dns:      f.Stats().DNS,
			warnings: len(warnings(r)),
			fails:    len(r.fails.all()),
		}
		if e.gate != nil {
			c.ca += int(e.gate.refused.Load())
		}
		return c
	}
	var before counts // before the host started: none
	if tc.renewal {
		before = snap()
	}
	caBefore := len(ca.Requests())
	clk.SetHorizon(start.Add(day))
	clk.WaitParked(t, 60*time.Second)

	after := snap()
	got := dayRow{
		attempts: after.attempts - before.attempts,
		broker:   after.broker - before.broker,
		ca:       after.ca - before.ca,
		dns:      after.dns - before.dns,
		warnings: after.warnings - before.warnings,
	}
	dayReqs := ca.Requests()[caBefore:]
	waits := r.retries()[before.attempts:]
	// One event per failure logged; the bus delivers them a little later.
	fails := waitFailures(t, r.fails, before.fails+len(waits))[before.fails:]

	// The policy's bounds over the day.
	if got.attempts < 2 {
		t.Fatalf("%d failed attempts in a day: the fault did not happen; log:\n%s", got.attempts, r.logs)
	}
	if got.attempts > maxAttemptsPerDay {
		t.Errorf("%d failed attempts in a day, want at most %d", got.attempts, maxAttemptsPerDay)
	}
	tc.checkWaits(t, waits)
	if tc.maxBroker > 0 && got.broker > tc.maxBroker {
		t.Errorf("%d broker requests in a day, want at most %d", got.broker, tc.maxBroker)
	}
	if tc.noCA && got.ca != 0 {
		t.Errorf("%d CA requests in a day although no order could succeed", got.ca)
	}
	if n := count(dayReqs, http.MethodPost, "/chalZ/"); tc.noValidation && n != 0 {
		t.Errorf("the CA was asked %d times to validate a TXT record that is not visible", n)
	}
	wantWarnings := 1
	if tc.warnings != 0 {
		wantWarnings = tc.warnings
	}
	if w := warnings(r)[before.warnings:]; len(w) != wantWarnings {
		var b strings.Builder
		for _, l := range w {
			b.WriteString(l.text)
		}
		t.Errorf("%d warnings in a day, want %d:\n%s", len(w), wantWarnings, b.String())
	}
	if c := r.m.cert.Load(); c != inUse {
		t.Fatalf("the certificate served changed during the fault (in use %v, now %v)", inUse != nil, c != nil)
	}
	lastRetry := fails[len(fails)-1].NextRetry

	// Clear the fault at the end of the day and let the clock run.
	dayEnd := start.Add(day)
	servedBefore := served.count()
	clear()
	clk.SetHorizon(dayEnd.Add(2 * retryCap))
	r.waitCert(t, inUse)
	servedAt := served.at(t, servedBefore)
	got.recovery = servedAt.Sub(dayEnd)
	if servedAt.Before(lastRetry) {
		t.Errorf("served at %v, before the retry the last failure announced (%v)", servedAt, lastRetry)
	}
	if got.recovery > tc.recover+slack {
		t.Errorf("recovered %v after the fault was cleared, want at most %v", got.recovery, tc.recover+slack)
	}
	return got
}
