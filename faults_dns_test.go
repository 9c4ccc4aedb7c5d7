package autotls

// Fault tests of DNS: a TXT record that never shows, one that shows late,
// and queries that get no answer. The TXT check stands between the broker
// accepting a challenge and the CA being asked to validate it: it must
// never let the CA validate what is not visible (a failed validation
// counts against the CA's limits), and must let it validate soon after
// the record shows. Times are on the fake clock of clock_test.go.

import (
	"context"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestFaultTXTNeverVisible: the broker accepts the challenge but its DNS
// never shows it. The TXT check gives up after its bound (3 min on the
// fake clock), the CA is never asked to validate (no POST to a challenge:
// an authorization that fails validation counts against the CA's limits),
// the attempt is retried with backoff, and succeeds once DNS answers.
func TestFaultTXTNeverVisible(t *testing.T) {
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	var hide atomic.Bool
	hide.Store(true)
	f.SetDNSFault(func(q dns.Question) testforge.DNSFault {
		return testforge.DNSFault{HideTXT: hide.Load()}
	})
	defer f.SetDNSFault(nil)

	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(5 * time.Minute))
	r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
	r.closers = append(r.closers, ca.Close)
	clk.WaitParked(t, 30*time.Second)

	waits := r.retries()
	checkBackoff(t, waits)
	reqs := ca.Requests()
	// The clock parks inside an attempt's TXT check (three minutes each)
	// or in the wait after one.
	if n := count(reqs, http.MethodPost, "/order-plz"); n != len(waits) && n != len(waits)+1 {
		t.Errorf("%d orders for %d failed attempts", n, len(waits))
	}
	if n := count(reqs, http.MethodPost, "/chalZ/"); n != 0 {
		t.Fatalf("the CA was asked %d times to validate a TXT record that is not visible", n)
	}
	w := warnings(r)
	if len(w) != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
	}
	t.Logf("the operator reads: %s", w[0].text)
	if !strings.Contains(w[0].text, "not visible") {
		t.Errorf("the warning does not say the TXT record is not visible")
	}
	pingOverTCP(t, f, r.h)

	hide.Store(false)
	clk.SetHorizon(clk.Now().Add(retryCap))
	r.waitLoaded(t)
	if n := count(ca.Requests(), http.MethodPost, "/chalZ/"); n != 1 {
		t.Errorf("%d validation requests for the successful attempt, want 1", n)
	}
	r.closeAndCheck(t, leaks)
}

// isChallengeTXT reports whether q asks for an _acme-challenge TXT record.
func isChallengeTXT(q dns.Question) bool {
	return q.Qtype == dns.TypeTXT && strings.HasPrefix(strings.ToLower(q.Name), "_acme-challenge.")
}

// TestFaultTXTLate: the broker accepts the challenge, but its DNS shows
// the record only 3 s later (on the fake clock), as a lagging secondary
// would. The CA is asked to validate only once the record shows, and
// within 250 ms of it (the TXT check polls fast at first); the
// certificate comes with no failure.
func TestFaultTXTLate(t *testing.T) {
	const lag = 3 * time.Second
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute)) // before the first ARI poll can be due
	var (
		mu sync.Mutex
		// Fake times: the broker accepting the registration, the first
		// answer that shows the record, the request to validate.
		accepted, visible, validate time.Time
		hidden                      int // TXT queries answered without the record
	)
	f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodPost && r.URL.Path == registerPath {
			mu.Lock()
			accepted = clk.Now() // the clock stands still while the manager waits for the answer
			mu.Unlock()
		}
		return false
	})
	defer f.SetBrokerFault(nil)
	f.SetDNSFault(func(q dns.Question) testforge.DNSFault {
		if !isChallengeTXT(q) {
			return testforge.DNSFault{}
		}
		mu.Lock()
		defer mu.Unlock()
		now := clk.Now()
		if accepted.IsZero() || now.Before(accepted.Add(lag)) {
			hidden++
			return testforge.DNSFault{HideTXT: true}
		}
		if visible.IsZero() {
			visible = now
		}
		return testforge.DNSFault{}
	})
	defer f.SetDNSFault(nil)
	ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/chalZ/") {
			mu.Lock()
			if validate.IsZero() {
				validate = clk.Now()
			}
			mu.Unlock()
		}
		return false
	})
	r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
	r.closers = append(r.closers, ca.Close)
	r.waitLoaded(t)

	mu.Lock()
	shows := accepted.Add(lag)
	t.Logf("the record was hidden from %d queries; it was seen %v after it showed, and the CA asked to validate %v after",
		hidden, visible.Sub(shows), validate.Sub(shows))
	switch {
	case accepted.IsZero() || visible.IsZero() || validate.IsZero():
		t.Errorf("registration at %v, record seen at %v, validation asked at %v: a step is missing", accepted, visible, validate)
	case validate.Before(shows):
		t.Errorf("the CA was asked to validate %v after the registration, before the record showed (%v)", validate.Sub(accepted), lag)
	case validate.Sub(shows) > 250*time.Millisecond:
		t.Errorf("the CA was asked to validate %v after the record showed, want ≤ 250 ms", validate.Sub(shows))
	}
	mu.Unlock()
	if n := count(ca.Requests(), http.MethodPost, "/chalZ/"); n != 1 {
		t.Errorf("%d validation requests, want 1", n)
	}
	if n := len(r.fails.all()); n != 0 {
		t.Errorf("%d failed attempts for a record 3 s late, want none:\n%s", n, r.logs)
	}
	r.closeAndCheck(t, leaks)
}

// TestFaultDNSUnanswered: the forge's DNS sends no answer at all to the
// first two TXT queries, as a lossy path would. Each lookup of the TXT
// check is bounded by 1 s (so a lost answer costs a second, not the
// resolver's own timeouts and attempts), the third query is answered, and
// the certificate comes with no failure. The host's resolver is a pure-Go
// one that dials the forge's DNS and records, at each dial, the time left
// before its context's deadline.
func TestFaultDNSUnanswered(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	type dial struct {
		left    time.Duration // until the context's deadline, when dialing
		bounded bool          // the context had a deadline
	}
	var mu sync.Mutex
	var dials []dial
	resolver := &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			deadline, ok := ctx.Deadline()
			mu.Lock()
			dials = append(dials, dial{left: time.Until(deadline), bounded: ok})
			mu.Unlock()
			var d net.Dialer
			return d.DialContext(ctx, network, f.DNSAddr)
		},
	}
	var queries atomic.Int32
	f.SetDNSFault(func(q dns.Question) testforge.DNSFault {
		return testforge.DNSFault{Drop: isChallengeTXT(q) && queries.Add(1) <= 2}
	})
	defer f.SetDNSFault(nil)
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute)) // before the first ARI poll can be due
	r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithResolver(resolver))
	r.waitLoaded(t)

	if n := queries.Load(); n < 3 {
		t.Fatalf("%d challenge TXT queries reached the DNS, want 2 dropped, then answered", n)
	}
	mu.Lock()
	got := slices.Clone(dials)
	mu.Unlock()
	lefts := make([]string, len(got))
	for i, d := range got {
		lefts[i] = d.left.Round(time.Millisecond).String()
	}
	t.Logf("the resolver dialed %d times, with %v left before the deadline", len(got), lefts)
	if len(got) < 3 {
		t.Errorf("%d dials by the host's resolver, want at least 3 (2 unanswered queries, then one answered)", len(got))
	}
	const slack = 5 * time.Millisecond
	for i, d := range got {
		if !d.bounded || d.left > time.Second+slack {
			t.Errorf("dial %d: deadline set %v, %v left: want a query bounded by 1 s", i+1, d.bounded, d.left)
		}
	}
	if n := len(r.fails.all()); n != 0 {
		t.Errorf("%d failed attempts for two lost answers, want none:\n%s", n, r.logs)
	}
	r.closeAndCheck(t, leaks)
}
