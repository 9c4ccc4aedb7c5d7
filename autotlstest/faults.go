package autotlstest

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/miekg/dns"

	"github.com/p2ptls/autotls/internal/testforge"
)

// faults is the state of the fault knobs. The forge's hooks are installed
// once, by New, and read it on every request.
type faults struct {
	mu          sync.Mutex
	brokerDown  bool
	brokerLeft  int           // broker requests still to fail
	brokerCode  int           // their status
	brokerAfter time.Duration // their Retry-After; zero: none
	txtDelay    time.Duration
	caUntil     time.Time // new orders refused until then
	refuseDial  bool
}

func (f *Forge) installFaults() {
	f.f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
		f.faults.mu.Lock()
		if f.faults.brokerLeft <= 0 {
			f.faults.mu.Unlock()
			return false
		}
		f.faults.brokerLeft--
		code, after := f.faults.brokerCode, f.faults.brokerAfter
		f.faults.mu.Unlock()
		if after > 0 {
			w.Header().Set("Retry-After", strconv.Itoa(ceilSeconds(after)))
		}
		w.WriteHeader(code)
		_, _ = fmt.Fprintf(w, "%d %s (autotlstest.FailBroker)", code, http.StatusText(code))
		return true
	})
	f.f.SetDNSFault(func(q dns.Question) testforge.DNSFault {
		if q.Qtype != dns.TypeTXT || !strings.HasPrefix(strings.ToLower(q.Name), "_acme-challenge.") {
			return testforge.DNSFault{}
		}
		f.faults.mu.Lock()
		defer f.faults.mu.Unlock()
		return testforge.DNSFault{Delay: f.faults.txtDelay}
	})
	f.ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		f.caRequests.Add(1)
		if r.Method != http.MethodPost || r.URL.Path != "/order-plz" {
			return false
		}
		f.faults.mu.Lock()
		left := time.Until(f.faults.caUntil)
		f.faults.mu.Unlock()
		if left <= 0 {
			return false
		}
		w.Header().Set("Retry-After", strconv.Itoa(ceilSeconds(left)))
		w.Header().Set("Content-Type", "application/problem+json")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = io.WriteString(w, `{"type":"urn:ietf:params:acme:error:rateLimited","status":429,"detail":"too many new orders recently (autotlstest.RateLimitCA)"}`)
		return true
	})
	f.f.SetDialBackFault(func(peer.ID, []string) error {
		f.faults.mu.Lock()
		defer f.faults.mu.Unlock()
		if f.faults.refuseDial {
			return errors.New("failed to dial: all dials failed (autotlstest.RefuseDialBack)")
		}
		return nil
	})
}

// ceilSeconds is d in whole seconds, rounded up: a Retry-After never names
// a time before the fault ends.
func ceilSeconds(d time.Duration) int {
	return int((d + time.Second - 1) / time.Second)
}

// BrokerDown takes the broker off the network: connections to it are
// refused, and those open are closed, as when the public broker is down.
// autotls reports the failure (an autotls.BrokerError with no status) and
// retries after seconds. [Forge.BrokerUp] brings it back on the same
// address.
func (f *Forge) BrokerDown() {
	f.tb.Helper()
	f.faults.mu.Lock()
	defer f.faults.mu.Unlock()
	if f.faults.brokerDown {
		return
	}
	if err := f.f.BrokerDown(); err != nil {
		f.tb.Fatalf("autotlstest: %v", err)
	}
	f.faults.brokerDown = true
}

// BrokerUp brings the broker back after [Forge.BrokerDown]; it does
// nothing if the broker is up.
func (f *Forge) BrokerUp() {
	f.tb.Helper()
	f.faults.mu.Lock()
	defer f.faults.mu.Unlock()
	if !f.faults.brokerDown {
		return
	}
	if err := f.f.BrokerUp(); err != nil {
		f.tb.Fatalf("autotlstest: %v", err)
	}
	f.faults.brokerDown = false
}

// FailBroker makes the broker answer its next n requests (health checks
// and registrations, each leg of PeerID auth included) with status and,
// if retryAfter is positive, a Retry-After of that many seconds (rounded
// up). autotls retries at the time a Retry-After names, or after seconds
// for a 5xx without one; a 4xx other than 429 is a refusal it retries
// only hours later. n of zero or less clears the fault.
func (f *Forge) FailBroker(n, status int, retryAfter time.Duration) {
	f.faults.mu.Lock()
	defer f.faults.mu.Unlock()
	f.faults.brokerLeft, f.faults.brokerCode, f.faults.brokerAfter = max(n, 0), status, retryAfter
}

// DelayTXT makes the forge's DNS server answer every _acme-challenge TXT
// query d late, as a slow authoritative server or a lagging resolver
// would; zero clears it. autotls asks the CA to validate only once it
// sees the record itself, with lookups of at most a second each: under a
// delay of more than a second the record stays invisible to it (and the
// attempt fails after three minutes), and once the delay is cleared the
// next lookup sees it. [Stats].TXT counts the lookups.
func (f *Forge) DelayTXT(d time.Duration) {
	f.faults.mu.Lock()
	defer f.faults.mu.Unlock()
	f.faults.txtDelay = max(d, 0)
}

// RateLimitCA makes the CA refuse every new order for the next d, as
// Let's Encrypt does once a rate limit is reached: 429 with the ACME
// problem rateLimited and a Retry-After naming the end of the limit (in
// whole seconds, rounded up). autotls retries at that time, at most 10 %
// later, and then succeeds. Zero clears it.
func (f *Forge) RateLimitCA(d time.Duration) {
	f.faults.mu.Lock()
	defer f.faults.mu.Unlock()
	if d <= 0 {
		f.faults.caUntil = time.Time{}
		return
	}
	f.faults.caUntil = time.Now().Add(d)
}

// RefuseDialBack makes the broker's dial-back fail while refuse is true,
// as when the host's port is not reachable from the broker: it answers
// 400 "error testing addresses: ...", like the public broker, and
// autotls.BrokerError.Unreachable reports true. autotls then waits at
// least 15 minutes before it tries again; a test sees recovery by
// clearing the fault and starting the host again (with the same identity
// and storage, or none).
func (f *Forge) RefuseDialBack(refuse bool) {
	f.faults.mu.Lock()
	defer f.faults.mu.Unlock()
	f.faults.refuseDial = refuse
}

// ClearFaults clears every fault: the broker is brought back up if it was
// down, and the other knobs are reset.
func (f *Forge) ClearFaults() {
	f.tb.Helper()
	f.BrokerUp()
	f.faults.mu.Lock()
	defer f.faults.mu.Unlock()
	f.faults.brokerLeft, f.faults.brokerCode, f.faults.brokerAfter = 0, 0, 0
	f.faults.txtDelay = 0
	f.faults.caUntil = time.Time{}
	f.faults.refuseDial = false
}
