package autotls

// Fault tests of DNS: a TXT record that never shows, one that shows late,
// and queries that get no answer. The TXT check stands between the broker
// accepting a challenge and the CA being asked to validate it: it must
// never let the CA validate what is not visible (a failed validation
// counts against the CA's limits), and must let it validate soon after
// the record shows. Times are on the fake clock of clock_test.go.

import (
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestFaultTXTNeverVisible: the broker accepts the challenge but its DNS
// never shows it. The TXT check gives up after its bound (shortened here
// from 3 min), the CA is never asked to validate (no POST to a challenge:
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
