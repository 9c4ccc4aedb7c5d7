package autotls

import (
	"net/http"
	"net/url"
	"time"
)

// retryAfterTransport is the CA client's transport. It keeps the
// Retry-After of the latest response, as an instant on the manager's
// clock, and the URL it came from, since acme.Client does not return
// headers from GetAuthorization, GetOrder or FinalizeOrder. The run
// goroutine alone uses it (requests are sent from the goroutine that
// makes them), so it needs no lock.
type retryAfterTransport struct {
	next  http.RoundTripper
	clock clock

	url string
	at  time.Time // zero: the latest response had no valid Retry-After
}

// RoundTrip implements http.RoundTripper.
func (t *retryAfterTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	var at time.Time
	if resp != nil {
		now := t.clock.Now()
		if d, ok := parseRetryAfter(resp.Header.Get("Retry-After"), now); ok {
			at = now.Add(d)
		}
	}
	t.url, t.at = req.URL.String(), at
	return resp, err
}

// CloseIdleConnections closes the idle connections of the transport
// underneath, so that none outlives the host.
func (t *retryAfterTransport) CloseIdleConnections() {
	if c, ok := t.next.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// latest returns the time named by the latest response's Retry-After.
func (t *retryAfterTransport) latest() (time.Time, bool) {
	return t.at, !t.at.IsZero()
}

// take returns the time named by the latest response's Retry-After if that
// response came from loc, and forgets it.
func (t *retryAfterTransport) take(loc string) (time.Time, bool) {
	loc = normalURL(loc)
	if t.url != loc || t.at.IsZero() {
		return time.Time{}, false
	}
	at := t.at
	t.at = time.Time{}
	return at, true
}

// move re-labels a Retry-After from the URL from which it came to the URL
// it is for.
func (t *retryAfterTransport) move(from, to string) {
	from, to = normalURL(from), normalURL(to)
	if t.url == from {
		t.url = to
	}
}

// normalURL is loc as a request's URL reads back, for comparisons.
func normalURL(loc string) string {
	if u, err := url.Parse(loc); err == nil {
		return u.String()
	}
	return loc
}
