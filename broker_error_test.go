package autotls

// BrokerError: its text, the body excerpt, Retry-After.

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestBrokerErrorText(t *testing.T) {
	tests := []struct {
		err  *BrokerError
		want string
	}{
		{&BrokerError{Op: "register", StatusCode: 400, Body: "error testing addresses: no good addresses"},
			"broker register: 400 Bad Request: error testing addresses: no good addresses"},
		{&BrokerError{Op: "health", StatusCode: 503, RetryAfter: 2 * time.Minute},
			"broker health: 503 Service Unavailable (retry after 2m0s)"},
		{&BrokerError{Op: "health", StatusCode: 599}, "broker health: 599"},
		{&BrokerError{Op: "health", Err: errors.New("dial tcp: connection refused")},
			"broker health: dial tcp: connection refused"},
		{&BrokerError{Op: "register"}, "broker register: no response"},
		{&BrokerError{Op: "health", StatusCode: 308, Location: "https://new.example/v1/health", Body: `<a href="https://new.example/v1/health">Permanent Redirect</a>.`},
			"broker health: 308 Permanent Redirect: redirected to https://new.example/v1/health, not followed: configure the broker's final URL as the endpoint (WithRegistrationEndpoint)"},
	}
	for _, tt := range tests {
		if got := tt.err.Error(); got != tt.want {
			t.Errorf("Error() = %q, want %q", got, tt.want)
		}
	}

	var buf strings.Builder
	slog.New(slog.NewTextHandler(&buf, nil)).Info("broker refused", "err", tests[0].err)
	if !strings.Contains(buf.String(), "err.status=400") || !strings.Contains(buf.String(), `err.op=register`) {
		t.Errorf("log line %q does not carry the fields", buf.String())
	}
	buf.Reset()
	slog.New(slog.NewTextHandler(&buf, nil)).Info("broker redirected", "err", tests[len(tests)-1].err)
	if !strings.Contains(buf.String(), "err.location=https://new.example/v1/health") {
		t.Errorf("log line %q does not carry the Location", buf.String())
	}
}

func TestExcerpt(t *testing.T) {
	long := strings.Repeat("é", 300) // 600 bytes of 2-byte runes
	tests := []struct {
		name, in, secret, want string
	}{
		{"trimmed", "  hello\n", "", "hello"},
		{"control characters", "a\x00b\r\nc", "", "a b  c"},
		{"invalid UTF-8", "a\xffb", "", "a\uFFFDb"},
		{"cut at a rune boundary", long, "", strings.Repeat("é", 256)},
		{"secret redacted", "token=s3cr3t;", "s3cr3t", "token=[redacted];"},
		{"empty", "", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := excerpt([]byte(tt.in), tt.secret); got != tt.want {
				t.Errorf("excerpt = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		in     string
		want   time.Duration
		wantOK bool
	}{
		{"120", 2 * time.Minute, true},
		{"0", 0, true},
		{" 7 ", 7 * time.Second, true},
		{"007", 7 * time.Second, true},
		{"604800", maxRetryAfter, true},
		{"604801", maxRetryAfter, true},
		{"99999999999999999999999999", maxRetryAfter, true},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second, true},
		{"Sunday, 01-Mar-26 12:05:00 GMT", 5 * time.Minute, true}, // RFC 850
		{"Sun Mar  1 12:00:30 2026", 30 * time.Second, true},      // ANSI C asctime
		{now.Add(-time.Hour).Format(http.TimeFormat), 0, true},
		{now.Add(30 * 24 * time.Hour).Format(http.TimeFormat), maxRetryAfter, true},
		{"", 0, false},
		{"-5", 0, false},
		{"+5", 0, false},
		{"1.5", 0, false},
		{"5s", 0, false},
		{"soon", 0, false},
		{"Sun, 01 Mar 2026 12:00:00 PST", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, ok := parseRetryAfter(tt.in, now)
			if got != tt.want || ok != tt.wantOK {
				t.Errorf("parseRetryAfter(%q) = %v, %v; want %v, %v", tt.in, got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

func FuzzParseRetryAfter(f *testing.F) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for _, seed := range []string{
		"", "0", "120", "-1", "604801", "18446744073709551616", " 30 ", "1e3",
		now.Format(http.TimeFormat), now.Add(time.Hour).Format(http.TimeFormat),
		"Sunday, 01-Mar-26 12:05:00 GMT", "Sun Mar  1 12:00:30 2026", "Fri, 31 Dec 9999 23:59:59 GMT",
		"Mon, 01 Jan 0001 00:00:00 GMT",
	} {
		f.Add(seed, now.Unix())
	}
	f.Fuzz(func(t *testing.T, v string, nowUnix int64) {
		now := time.Unix(nowUnix, 0)
		d, ok := parseRetryAfter(v, now)
		if d < 0 || d > maxRetryAfter {
			t.Fatalf("parseRetryAfter(%q, %v) = %v, outside [0, %v]", v, now, d, maxRetryAfter)
		}
		if !ok && d != 0 {
			t.Fatalf("parseRetryAfter(%q, %v) = %v with ok false", v, now, d)
		}
		if isDigits(strings.TrimSpace(v)) && !ok {
			t.Fatalf("parseRetryAfter(%q) rejected delay-seconds", v)
		}
	})
}

// ExampleBrokerError_classify shows how to tell the broker's refusals apart in an
// error chain.
func ExampleBrokerError_classify() {
	// As a failed registration might surface, wrapped by its caller.
	err := fmt.Errorf("obtaining certificate: %w", &BrokerError{
		Op:         "register",
		StatusCode: http.StatusTooManyRequests,
		RetryAfter: 90 * time.Second,
	})

	var be *BrokerError
	if errors.As(err, &be) {
		switch {
		case be.Unreachable():
			fmt.Println("the broker cannot dial this host: fix port forwarding first")
		case be.Temporary():
			fmt.Println("temporary broker failure; retry in", be.RetryAfter)
		default:
			fmt.Println("the broker refused:", be)
		}
	}
	// Output: temporary broker failure; retry in 1m30s
}
