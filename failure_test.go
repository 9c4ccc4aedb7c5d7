package autotls

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/mholt/acmez/v3/acme"
)

// TestFailureKey: the failures logged once (then at debug level while they
// repeat) are told apart by cause, not by error text, which changes between
// attempts of the same failure.
func TestFailureKey(t *testing.T) {
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
		return wrap(fmt.Errorf("finalizing the order %s: %w", detail, acme.Problem{Type: typ, Detail: detail}))
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
	} {
		if got := failureKey(tc.a) == failureKey(tc.b); got != tc.same {
			t.Errorf("%s: same key %v, want %v (%q, %q)", tc.name, got, tc.same, failureKey(tc.a), failureKey(tc.b))
		}
	}
}
