package autotls

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"time"

	"github.com/mholt/acmez/v3/acme"
)

// Retry policy. A failure that names its own time (a Retry-After from the
// broker or the CA) is retried then, at most 10 % later; the issuance
// budget (budget.go) names its own time, which is kept exactly. Any other
// transient failure is retried after an exponential backoff with full
// jitter, from a few seconds up to retryCap, so that a blip costs seconds
// and many nodes failing together do not come back together; once the
// exponential passes the cap, the wait is between half the cap and the
// cap, so that a day of outage costs at most 20 attempts (12 while the
// backoff grows, 8 at the cap). Failures that a quick retry cannot mend,
// and that cost the CA's patience, keep a floor applied after the jitter.
const (
	retryBase = 6 * time.Second
	retryCap  = 6 * time.Hour
	// unreachableFloor: the broker could not dial the host back; retrying
	// cannot help until the network changes.
	unreachableFloor = 15 * time.Minute
	// validationFloor: the CA could not validate the challenge. Let's
	// Encrypt allows five failed validations per identifier and account
	// per hour; one every 15 minutes stays under it.
	validationFloor = 15 * time.Minute
)

// failureKind sorts failures by what to do about them.
type failureKind string

const (
	kindBroker        failureKind = "broker"             // the broker failed or refused
	kindUnreachable   failureKind = "broker_unreachable" // the broker could not dial the host back
	kindTXT           failureKind = "txt_not_visible"    // the challenge's TXT record did not show
	kindCA            failureKind = "ca"                 // the CA failed or refused
	kindCAUnreachable failureKind = "ca_unreachable"     // no answer from the CA
	kindValidation    failureKind = "ca_validation"      // the CA could not validate the challenge
	kindRateLimited   failureKind = "ca_rate_limited"    // the CA's rate limit
	kindStorage       failureKind = "storage"            // reading or writing storage failed
	kindLock          failureKind = "lock"               // the storage's lock was not had in time
	kindBudget        failureKind = "budget"             // the CA's limit on certificates for the name is spent (budget.go)
	kindOther         failureKind = "other"
)

// failure is what [classify] makes of an error: everything the run loop,
// the logs and the events need.
type failure struct {
	kind failureKind
	// key tells failures apart for logging: a failure with the same key as
	// the one before is said at debug level only. Error texts change from
	// one attempt to the next (order URLs, what a lookup found), so known
	// causes are keyed by what they are.
	key string
	// sentence is the operator's headline.
	sentence string
	// floor is the least wait before the next attempt, jitter included.
	floor time.Duration
	// permanent: a change is needed; retry at the cap.
	permanent bool
	// retryAt is the time the broker or the CA named; zero if none.
	retryAt time.Time
}

// caError marks an error from the CA's side of an order, with the
// Retry-After of the CA's last response.
type caError struct {
	ca      string // directory URL
	retryAt time.Time
	err     error
}

func (e *caError) Error() string { return fmt.Sprintf("ACME order at %s: %v", e.ca, e.err) }
func (e *caError) Unwrap() error { return e.err }

// storageError: reading or writing storage failed.
type storageError struct {
	op  string
	err error
}

func (e *storageError) Error() string { return e.op + ": " + e.err.Error() }
func (e *storageError) Unwrap() error { return e.err }

// lockError: the storage's lock for the name was not had in time.
type lockError struct {
	name string
	err  error
}

func (e *lockError) Error() string {
	return fmt.Sprintf("taking the storage lock %q: %v", e.name, e.err)
}
func (e *lockError) Unwrap() error { return e.err }

// classify is the one place that decides what a failure is: its kind, its
// log key, the operator's sentence, the least delay and the time named by
// a Retry-After. now is the manager's clock.
func classify(err error, now time.Time) failure {
	var (
		be   *BrokerError
		txt  *txtNotVisibleError
		prob acme.Problem
		ce   *caError
		se   *storageError
		le   *lockError
		bud  *budgetError
		nyv  *notYetValidError
		exp  *expiredError
		pe   *profileError
		na   errNoBrokerAddrs
	)
	switch {
	case errors.As(err, &be):
		// Keyed by status, not by call: a broker down at registration
		// stays down at the health check that follows.
		f := failure{kind: kindBroker, key: fmt.Sprintf("broker %d", be.StatusCode)}
		if be.RetryAfter > 0 {
			f.retryAt = now.Add(be.RetryAfter)
		}
		switch {
		case be.Unreachable():
			f.kind, f.floor = kindUnreachable, unreachableFloor
			f.key += " dial-back"
			f.sentence = "certificate request failed: the broker could not dial this node back; check that its TCP port is reachable from the internet (port forwarding, UPnP, firewall)"
		case be.StatusCode == http.StatusForbidden:
			f.permanent = true
			f.sentence = "certificate request refused by the broker (403): check the access token (WithAccessToken, FORGE_ACCESS_TOKEN) or whether this address is denylisted"
		case be.StatusCode >= 300 && be.StatusCode < 400:
			f.permanent = true
			f.sentence = "the broker redirected the request; set WithRegistrationEndpoint to the final URL"
		case be.StatusCode == 0:
			f.sentence = "the broker is unreachable; retrying"
		case be.Temporary():
			f.sentence = "the broker is temporarily unavailable; retrying"
		default:
			f.permanent = true
			f.sentence = "certificate request refused by the broker"
		}
		return f
	case errors.As(err, &pe):
		// Nothing was sent but a read of the CA's directory; another
		// attempt soon would read the same.
		return failure{kind: kindCA, key: "ca profile", permanent: true,
			sentence: "certificate request not sent: " + pe.Error()}
	case errors.As(err, &na):
		return failure{kind: kindUnreachable, key: "no broker addrs",
			sentence: "certificate request stopped: " + na.Error()}
	case errors.As(err, &txt):
		return failure{kind: kindTXT, key: string(kindTXT),
			sentence: "the broker accepted the challenge but its TXT record did not become visible; check that the resolver reaches the forge's DNS"}
	case errors.As(err, &bud):
		return failure{kind: kindBudget, key: string(kindBudget), retryAt: bud.frees,
			sentence: fmt.Sprintf("certificate request held back: %d certificates for this name in 7 days is the CA's limit (Let's Encrypt: 5 per exact set of names per week); requesting again at %s, when it frees up",
				bud.count, bud.frees.UTC().Format(time.RFC3339))}
	case errors.As(err, &le):
		return failure{kind: kindLock, key: string(kindLock),
			sentence: "another process holds the storage lock for this certificate; retrying (if no other process shares this storage, a stale lock is in the way)"}
	case errors.As(err, &nyv), errors.As(err, &exp):
		return failure{kind: kindOther, key: "clock",
			sentence: "a certificate is not valid at this machine's time; check the clock"}
	case errors.As(err, &se):
		return failure{kind: kindStorage, key: string(kindStorage),
			sentence: "certificate storage failed (" + se.op + "); check that it is readable and writable"}
	}
	f := failure{kind: kindOther, key: err.Error(), sentence: "certificate request failed"}
	caName := "the CA"
	if errors.As(err, &ce) {
		caName = "the CA (" + ce.ca + ")"
		f.retryAt = ce.retryAt
		if sentence, ok := caUnreachable(err, caName); ok {
			f.kind, f.key = kindCAUnreachable, string(kindCAUnreachable)
			f.sentence = sentence
		} else {
			// An answer that is not an ACME problem (a load balancer's
			// page, garbage); a problem is told apart below.
			f.kind, f.key = kindCA, "ca failing"
			f.sentence = caName + " is failing; retrying"
		}
	}
	if errors.As(err, &prob) {
		f.key = fmt.Sprintf("ca %s %d", prob.Type, prob.Status)
		f.kind = kindCA
		switch {
		case isValidationFailure(prob):
			f.kind, f.floor = kindValidation, validationFloor
			f.key += " validation"
			f.sentence = "the CA could not validate the DNS-01 challenge that this node saw published; retrying later, within the CA's limit on failed validations"
		case prob.Type == acme.ProblemTypeRateLimited || prob.Status == http.StatusTooManyRequests:
			f.kind = kindRateLimited
			f.sentence = "certificate request refused by the CA: rate limited; retrying at the time it gave"
		case prob.Status >= 500 || prob.Type == acme.ProblemTypeServerInternal || prob.Type == acme.ProblemTypeBadNonce:
			f.sentence = caName + " is failing; retrying"
		default:
			// A refusal (rejectedIdentifier, badCSR, unauthorized...):
			// retrying soon would meet it again.
			f.permanent = true
			f.sentence = "certificate request refused by the CA"
		}
	}
	return f
}

// refusedReplaces tells whether err, from creating an order that names the
// certificate it replaces, may be about that name: any ACME problem except
// those that say to come back later (rate limits, 429, 503), which an order
// without "replaces" would meet as well.
func refusedReplaces(err error) bool {
	var prob acme.Problem
	if !errors.As(err, &prob) {
		return false
	}
	switch {
	case prob.Type == acme.ProblemTypeRateLimited,
		prob.Status == http.StatusTooManyRequests,
		prob.Status == http.StatusServiceUnavailable:
		return false
	}
	return true
}

// isValidationFailure reports whether prob is the CA's verdict on a
// challenge it tried to validate (the issuer attaches the invalid
// authorization).
func isValidationFailure(prob acme.Problem) bool {
	_, ok := prob.Resource.(acme.Authorization)
	return ok
}

// retryDelay is the wait before the next attempt after the attempt-th
// consecutive failure f, at now.
func retryDelay(f failure, attempt int, now time.Time) time.Duration {
	var d time.Duration
	switch {
	case f.kind == kindBudget:
		// Our own count names the time, exactly: nothing is sent before
		// it, and the hosts sharing the count take turns under its lock.
		d = max(f.retryAt.Sub(now), 0)
	case !f.retryAt.IsZero():
		ra := max(f.retryAt.Sub(now), 0)
		d = ra + rand.N(ra/10+1)
	case f.permanent:
		d = retryCap - rand.N(retryCap/10)
	default:
		ceiling := retryBase << min(attempt-1, 20)
		if ceiling < retryCap {
			d = rand.N(ceiling) + 1
		} else {
			d = retryCap/2 + rand.N(retryCap/2+1)
		}
	}
	return max(d, f.floor)
}
