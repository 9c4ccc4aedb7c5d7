package autotls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mholt/acmez/v3/acme"
)

// refused is the error of a dial to a closed port, as net/http returns it.
func refused() error {
	return &url.Error{Op: "Post", URL: "https://ca/dir", Err: &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}}
}

// TestClassifyKey: the failures logged once (then at debug level while
// they repeat) are told apart by cause, not by error text, which changes
// between attempts of the same failure.
func TestClassifyKey(t *testing.T) {
	t.Parallel()
	now := time.Now()
	failureKey := func(err error) string { return classify(err, now).key }
	wrap := func(err error) error {
		return fmt.Errorf("[*.x.libp2p.direct] Obtain: ACME order at https://ca/dir: %w", err)
	}
	txt := func(last string) error {
		return wrap(&txtNotVisibleError{name: "_acme-challenge.x.libp2p.direct.", timeout: time.Minute, last: errors.New(last)})
	}
	broker := func(status int, body string) error {
		return wrap(&BrokerError{Op: "register", StatusCode: status, Body: body})
	}
	ca := func(typ, detail string) error {
		return wrap(&caError{ca: "https://ca/dir/" + detail, err: fmt.Errorf("finalizing the order %s: %w", detail, acme.Problem{Type: typ, Detail: detail})})
	}
	caDown := func(endpoint string) error {
		return wrap(&caError{ca: "https://ca/dir", err: fmt.Errorf("POST %s: %w", endpoint, refused())})
	}
	for _, tc := range []struct {
		name string
		a, b error
		same bool
	}{
		{"TXT, whatever the last lookup found", txt("found 1 other TXT value(s)"), txt("i/o timeout"), true},
		{"broker, same status, other body", broker(502, "bad gateway (a)"), broker(502, "bad gateway (b)"), true},
		{"broker, other status", broker(502, ""), broker(503, ""), false},
		{"broker unreachable, or another 400", broker(400, "error testing addresses: x"), broker(400, "invalid json"), false},
		{"CA, same problem, other order", ca(acme.ProblemTypeNamespace+"serverInternal", "https://ca/order/1"), ca(acme.ProblemTypeNamespace+"serverInternal", "https://ca/order/2"), true},
		{"CA, other problem", ca(acme.ProblemTypeRateLimited, "o"), ca(acme.ProblemTypeNamespace+"serverInternal", "o"), false},
		{"TXT, or the broker", txt("x"), broker(502, ""), false},
		{"other errors, by text", wrap(errors.New("disk full")), wrap(errors.New("permission denied")), false},
		{"CA unreachable, whatever the endpoint", caDown("https://ca/new-order"), caDown("https://ca/new-nonce"), true},
		{"storage, whatever the path", wrap(&storageError{"storing the certificate", errors.New("open /a: read-only file system")}), wrap(&storageError{"storing the certificate", errors.New("open /b: read-only file system")}), true},
	} {
		if got := failureKey(tc.a) == failureKey(tc.b); got != tc.same {
			t.Errorf("%s: same key %v, want %v (%q, %q)", tc.name, got, tc.same, failureKey(tc.a), failureKey(tc.b))
		}
	}
}

// TestClassifyNoBrokerAddrs: a host left with no address for the broker
// between the gate and the challenge is said as its own reachability, not
// as the CA failing, though the error comes back through the CA's order.
func TestClassifyNoBrokerAddrs(t *testing.T) {
	t.Parallel()
	err := fmt.Errorf("[*.x.libp2p.direct] Obtain: %w", &caError{ca: "https://ca/dir",
		err: fmt.Errorf("presenting the challenge for x: %w", errNoBrokerAddrs("the host has no public TCP address to offer the broker"))})
	f := classify(err, time.Now())
	if f.kind != kindUnreachable || !strings.Contains(f.sentence, "no public TCP address") {
		t.Errorf("classified as %s: %q", f.kind, f.sentence)
	}
}

// TestClassifyDelays: what each failure asks of the run loop.
func TestClassifyDelays(t *testing.T) {
	t.Parallel()
	now := time.Now()
	authz := acme.Problem{Type: acme.ProblemTypeNamespace + "unauthorized", Resource: acme.Authorization{}}
	for _, tc := range []struct {
		name      string
		err       error
		kind      failureKind
		floor     time.Duration
		permanent bool
		retryIn   time.Duration // 0: none named
		says      string        // in the sentence
	}{
		{"broker 503 with Retry-After", &BrokerError{Op: "register", StatusCode: 503, RetryAfter: 5 * time.Second}, kindBroker, 0, false, 5 * time.Second, "temporarily unavailable"},
		{"broker refused connection", &BrokerError{Op: "health", Err: errors.New("connection refused")}, kindBroker, 0, false, 0, "unreachable"},
		{"dial-back failed", &BrokerError{Op: "register", StatusCode: 400, Body: "error testing addresses: dial backoff"}, kindUnreachable, unreachableFloor, false, 0, "dial this node back"},
		{"broker 403", &BrokerError{Op: "register", StatusCode: 403}, kindBroker, 0, true, 0, "access token"},
		{"broker redirect", &BrokerError{Op: "health", StatusCode: 302}, kindBroker, 0, true, 0, "WithRegistrationEndpoint"},
		{"TXT not visible", &txtNotVisibleError{name: "_acme-challenge.x.", timeout: time.Minute}, kindTXT, 0, false, 0, "TXT record"},
		{"invalid authorization", &caError{ca: "https://ca/dir", err: authz}, kindValidation, validationFloor, false, 0, "could not validate"},
		{"rate limited", &caError{ca: "https://ca/dir", retryAt: now.Add(time.Hour), err: acme.Problem{Type: acme.ProblemTypeRateLimited, Status: 429}}, kindRateLimited, 0, false, time.Hour, "rate limited"},
		{"CA 503", &caError{ca: "https://ca/dir", retryAt: now.Add(2 * time.Second), err: acme.Problem{Type: acme.ProblemTypeServerInternal, Status: 503}}, kindCA, 0, false, 2 * time.Second, "https://ca/dir"},
		{"CA unreachable", &caError{ca: "https://ca/dir", err: refused()}, kindCAUnreachable, 0, false, 0, "the CA (https://ca/dir) is unreachable; retrying"},
		{"CA name unknown", &caError{ca: "https://ca.invalid/dir", err: &url.Error{Op: "Get", URL: "https://ca.invalid/dir", Err: &net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{Name: "ca.invalid", Err: "no such host", IsNotFound: true}}}}, kindCAUnreachable, 0, false, 0, "the CA (https://ca.invalid/dir) is unreachable: its name does not resolve (ca.invalid)"},
		{"CA not trusted", &caError{ca: "https://ca/dir", err: &url.Error{Op: "Get", URL: "https://ca/dir", Err: &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}}}, kindCAUnreachable, 0, false, 0, "the CA (https://ca/dir) is unreachable: its HTTPS certificate is not trusted here"},
		{"CA answer not understood", &caError{ca: "https://ca/dir", err: errors.New("HTTP 503: <html>No server is available</html>")}, kindCA, 0, false, 0, "the CA (https://ca/dir) is failing; retrying"},
		{"storage", &storageError{"storing the certificate", errors.New("read-only file system")}, kindStorage, 0, false, 0, "storage"},
		{"lock", &lockError{name: "issue_cert_x", err: context.DeadlineExceeded}, kindLock, 0, false, 0, "lock"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := classify(fmt.Errorf("obtaining: %w", tc.err), now)
			if f.kind != tc.kind || f.floor != tc.floor || f.permanent != tc.permanent {
				t.Errorf("kind %s, floor %v, permanent %v; want %s, %v, %v", f.kind, f.floor, f.permanent, tc.kind, tc.floor, tc.permanent)
			}
			if !strings.Contains(f.sentence, tc.says) {
				t.Errorf("sentence %q does not say %q", f.sentence, tc.says)
			}
			for attempt := 1; attempt <= 30; attempt++ {
				d := retryDelay(f, attempt, now)
				switch {
				case tc.retryIn > 0 && (d < tc.retryIn || d > tc.retryIn+tc.retryIn/10):
					t.Fatalf("attempt %d: %v after a Retry-After of %v, want at most 10 %% later", attempt, d, tc.retryIn)
				case d < tc.floor:
					t.Fatalf("attempt %d: %v, below the floor %v", attempt, d, tc.floor)
				case tc.permanent && d < retryCap*9/10:
					t.Fatalf("attempt %d: %v for a failure that needs a change first", attempt, d)
				case d > max(retryCap, tc.floor, tc.retryIn+tc.retryIn/10):
					t.Fatalf("attempt %d: %v, beyond the cap", attempt, d)
				}
			}
		})
	}
}

// TestRetryPolicyBounds: the transient backoff recovers fast from a blip
// and stays polite through a long outage: two failures in a row are
// retried within 30 s in all, and a day of failures costs at most 20
// attempts, in every one of many random draws (a bound that holds for any
// draw: 12 attempts while the backoff grows, then at least 3 h apart).
func TestRetryPolicyBounds(t *testing.T) {
	t.Parallel()
	f := classify(&BrokerError{Op: "health", StatusCode: 503}, time.Now())
	worst := 0
	for range 5000 {
		if d := retryDelay(f, 1, time.Time{}) + retryDelay(f, 2, time.Time{}); d > 30*time.Second {
			t.Fatalf("two 503s in a row cost %v, want at most 30 s", d)
		}
		var elapsed time.Duration
		n := 0
		for attempt := 1; elapsed < 24*time.Hour; attempt++ {
			n++
			elapsed += retryDelay(f, attempt, time.Time{})
		}
		worst = max(worst, n)
	}
	t.Logf("a day of broker outage: at most %d attempts in 5000 draws", worst)
	if worst > 20 {
		t.Errorf("a day of outage cost %d attempts, want at most 20", worst)
	}
}
