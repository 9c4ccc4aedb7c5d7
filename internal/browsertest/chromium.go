package browsertest

import (
	"regexp"
	"slices"
	"strings"
	"sync"
)

// resolverRules makes every name that rules does not map unresolvable, so
// that nothing leaks to a real nameserver: Chromium applies the first rule
// that matches a host, and the exclusions keep the page's own origin.
func resolverRules(rules string) string {
	const rest = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"
	if strings.TrimSpace(rules) == "" {
		return rest
	}
	return rules + ", " + rest
}

// tailBuffer is an io.Writer that keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
	cut bool
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
		t.cut = true
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cut {
		return "[…]" + string(t.buf)
	}
	return string(t.buf)
}

// handshakeError matches the line Chromium logs (at its default level) when
// a TLS handshake fails, e.g. "handshake failed; returned -1, SSL error
// code 1, net_error -202". A page only sees a bare WebSocket error event.
var handshakeError = regexp.MustCompile(`handshake failed;.* net_error (-\d+)`)

// netErrors names the net errors a failed handshake usually has, from
// Chromium's net/base/net_error_list.h.
var netErrors = map[string]string{
	"-107": "ERR_SSL_PROTOCOL_ERROR",
	"-113": "ERR_SSL_VERSION_OR_CIPHER_MISMATCH",
	"-200": "ERR_CERT_COMMON_NAME_INVALID",
	"-201": "ERR_CERT_DATE_INVALID",
	"-202": "ERR_CERT_AUTHORITY_INVALID",
	"-207": "ERR_CERT_INVALID",
	"-213": "ERR_CERT_VALIDITY_TOO_LONG",
	"-214": "ERR_CERTIFICATE_TRANSPARENCY_REQUIRED",
}

// tlsFailures describes the failed TLS handshakes in Chromium's log, or
// returns "".
func tlsFailures(log string) string {
	var seen []string
	for _, m := range handshakeError.FindAllStringSubmatch(log, -1) {
		e := "net error " + m[1]
		if name, ok := netErrors[m[1]]; ok {
			e += " " + name
		}
		if !slices.Contains(seen, e) {
			seen = append(seen, e)
		}
	}
	if len(seen) == 0 {
		return ""
	}
	return "chromium: TLS handshake failed: " + strings.Join(seen, ", ")
}

// withoutNoise drops the lines of Chromium's log that say nothing about the
// page: complaints about the missing D-Bus of a headless machine.
func withoutNoise(log string) string {
	lines := strings.SplitAfter(log, "\n")
	return strings.Join(slices.DeleteFunc(lines, func(l string) bool {
		return strings.Contains(l, ":dbus/") || strings.Contains(l, "D-Bus")
	}), "")
}
