package autotls

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// BrokerError is the error of a failed call to the forge's registration
// broker: a response other than the expected success, or no response at all.
// Use [errors.As] to find it in an error chain and decide what to do:
// [BrokerError.Temporary] failures are worth retrying (after RetryAfter when
// the broker gives one), [BrokerError.Unreachable] means the broker could not
// dial the host back, and other failures need a configuration change.
//
// A BrokerError never contains the access token.
type BrokerError struct {
	// Op is the call that failed: "health" or "register".
	Op string
	// StatusCode is the HTTP status of the broker's response, or 0 when
	// there was none (network error, timeout, cancellation).
	StatusCode int
	// Body is an excerpt of the response body: at most 512 bytes of valid
	// UTF-8, trimmed, with control characters replaced by spaces. Location
	// is where a redirect (3xx), never followed, pointed.
	Body, Location string
	// RetryAfter is the delay a Retry-After header asked for (seconds or
	// HTTP-date), capped at 7 days; 0 when absent or invalid.
	RetryAfter time.Duration
	// Err is the underlying error, if any: a network error when StatusCode
	// is 0, or why the PeerID authentication did not complete.
	Err error
}

// Error returns a one-line description, such as
// "broker register: 400 Bad Request: error testing addresses: ...".
func (e *BrokerError) Error() string {
	var b strings.Builder
	b.WriteString("broker ")
	b.WriteString(e.Op)
	if e.StatusCode != 0 {
		b.WriteString(": ")
		b.WriteString(statusLine(e.StatusCode))
	}
	if e.Location != "" {
		b.WriteString(": redirected to ")
		b.WriteString(e.Location)
		b.WriteString(", not followed: configure the broker's final URL as the endpoint (WithRegistrationEndpoint)")
	} else if e.Body != "" {
		b.WriteString(": ")
		b.WriteString(e.Body)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	if e.StatusCode == 0 && e.Err == nil {
		b.WriteString(": no response")
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, " (retry after %v)", e.RetryAfter)
	}
	return b.String()
}

// Unwrap returns the underlying error, if any.
func (e *BrokerError) Unwrap() error { return e.Err }

// Temporary reports whether the failure may go away by itself: a network
// error or timeout (not a cancellation), 408, 425, 429 or any 5xx. Other
// responses (4xx, a redirect) need a change first.
func (e *BrokerError) Temporary() bool {
	switch {
	case e.StatusCode == 0:
		return !errors.Is(e.Err, context.Canceled) && !errors.Is(e.Err, errOffEndpoint)
	case e.StatusCode >= 500:
		return true
	}
	switch e.StatusCode {
	case http.StatusRequestTimeout, http.StatusTooEarly, http.StatusTooManyRequests:
		return true
	}
	return false
}

// Unreachable reports whether the broker refused a registration because it
// could not dial the host back at any of the addresses sent (400 "error
// testing addresses: ..."). Retrying is pointless until the host is
// reachable; each retry that reaches the CA costs a failed authorization.
func (e *BrokerError) Unreachable() bool {
	return e.StatusCode == http.StatusBadRequest && strings.HasPrefix(e.Body, "error testing addresses")
}

// LogValue implements [slog.LogValuer]: the fields as a group.
func (e *BrokerError) LogValue() slog.Value {
	attrs := []slog.Attr{slog.String("op", e.Op)}
	if e.StatusCode != 0 {
		attrs = append(attrs, slog.Int("status", e.StatusCode))
	}
	if e.Body != "" {
		attrs = append(attrs, slog.String("body", e.Body))
	}
	if e.Location != "" {
		attrs = append(attrs, slog.String("location", e.Location))
	}
	if e.RetryAfter > 0 {
		attrs = append(attrs, slog.Duration("retry_after", e.RetryAfter))
	}
	if e.Err != nil {
		attrs = append(attrs, slog.String("err", e.Err.Error()))
	}
	return slog.GroupValue(attrs...)
}

// statusLine returns "404 Not Found", or just the code if it has no text.
func statusLine(code int) string {
	if text := http.StatusText(code); text != "" {
		return strconv.Itoa(code) + " " + text
	}
	return strconv.Itoa(code)
}

// replaced by "[redacted]".
func excerpt(b []byte, secret string) string {
	s := strings.ToValidUTF8(string(b), "\uFFFD")
	if secret != "" {
		s = strings.ReplaceAll(s, secret, "[redacted]")
	}
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	s = strings.TrimSpace(s)
	if len(s) > maxErrorBody {
		cut := maxErrorBody
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = strings.TrimSpace(s[:cut])
	}
	return s
}

// parseRetryAfter interprets a Retry-After header value (RFC 9110 §10.2.3):
// delay-seconds (a non-negative decimal integer) or an HTTP-date, relative to
// now. A date in the past gives 0; any delay is capped at 7 days. ok is false
// (and the delay 0) when v is empty or neither form.
func parseRetryAfter(v string, now time.Time) (d time.Duration, ok bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if isDigits(v) {
		secs, err := strconv.ParseUint(v, 10, 64)
		if err != nil || secs > uint64(maxRetryAfter/time.Second) {
			return maxRetryAfter, true // only digits, so only too large
		}
		return time.Duration(secs) * time.Second, true
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return 0, false
	}
	// Compare before subtracting: Sub saturates, but stay explicit.
	switch {
	case !t.After(now):
		return 0, true
	case t.After(now.Add(maxRetryAfter)):
		return maxRetryAfter, true
	}
	return t.Sub(now), true
}

// isDigits reports whether s is non-empty and all ASCII digits.
func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}
