package autotls

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	ma "github.com/multiformats/go-multiaddr"
)

// testChallengeValue looks like a DNS-01 value: 43 characters of unpadded
// base64url (a SHA-256 digest).
const testChallengeValue = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"

// testAccessToken is a recognisable secret that must never appear in errors.
const testAccessToken = "tok-3f9b2c7e-never-print-me"

// newLoopbackServer starts an HTTP server on 127.0.0.1 with handler h.
func newLoopbackServer(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &httptest.Server{Listener: l, Config: &http.Server{Handler: h}}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// newLoopbackTLSServer starts an HTTPS server on 127.0.0.1 with handler h;
// its Client() trusts its certificate (the one all httptest servers share).
func newLoopbackTLSServer(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &httptest.Server{Listener: l, Config: &http.Server{Handler: h}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

// connTracker follows a server's connections through its ConnState hook.
// The zero value is ready to use.
type connTracker struct {
	mu      sync.Mutex
	open    map[net.Conn]bool
	opened  int
	changed chan struct{} // closed and replaced on every change
}

// hook is the server's ConnState hook.
func (ct *connTracker) hook(c net.Conn, state http.ConnState) {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	if ct.open == nil {
		ct.open = map[net.Conn]bool{}
	}
	switch state {
	case http.StateNew:
		ct.open[c] = true
		ct.opened++
	case http.StateClosed, http.StateHijacked:
		delete(ct.open, c)
	}
	if ct.changed != nil {
		close(ct.changed)
		ct.changed = nil
	}
}

// counts returns how many connections were ever accepted and how many are
// open now.
func (ct *connTracker) counts() (opened, open int) {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	return ct.opened, len(ct.open)
}

// waitAllClosed waits until every connection accepted so far is closed,
// failing the test if some are still open after timeout.
func (ct *connTracker) waitAllClosed(t *testing.T, timeout time.Duration) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		ct.mu.Lock()
		n := len(ct.open)
		if ct.changed == nil {
			ct.changed = make(chan struct{})
		}
		changed := ct.changed
		ct.mu.Unlock()
		if n == 0 {
			return
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("%d connections still open at the server %v later", n, timeout)
		}
	}
}

// newTestBrokerClient returns a client for endpoint with a fresh key; edit
// adjusts the configuration first.
func newTestBrokerClient(t *testing.T, endpoint string, edit func(*brokerConfig)) *brokerClient {
	t.Helper()
	cfg := brokerConfig{Endpoint: endpoint, Key: genTestKey(t), AccessToken: testAccessToken}
	if edit != nil {
		edit(&cfg)
	}
	c, err := newBrokerClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// asBrokerError returns the *BrokerError in err's chain, failing if none.
func asBrokerError(t *testing.T, err error) *BrokerError {
	t.Helper()
	var be *BrokerError
	if !errors.As(err, &be) {
		t.Fatalf("error %v (%T) is not a *BrokerError", err, err)
	}
	if strings.Contains(err.Error(), testAccessToken) {
		t.Errorf("the access token appears in the error: %v", err)
	}
	return be
}

var testAddrs = []ma.Multiaddr{
	ma.StringCast("/ip4/203.0.113.7/tcp/4001"),
	ma.StringCast("/ip6/2001:db8::1/udp/4001/quic-v1"),
}

func TestBrokerHealth(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name          string
		status        int
		retryAfter    string
		body          string
		wantOK        bool
		wantTemporary bool
		wantRetry     time.Duration
	}{
		{name: "204 healthy", status: 204, wantOK: true},
		{name: "200 is not healthy", status: 200, body: "ok"},
		{name: "503 with delay-seconds", status: 503, retryAfter: "120", body: "maintenance", wantTemporary: true, wantRetry: 2 * time.Minute},
		{name: "503 with HTTP-date", status: 503, retryAfter: now.Add(90 * time.Second).Format(http.TimeFormat), wantTemporary: true, wantRetry: 90 * time.Second},
		{name: "503 with date in the past", status: 503, retryAfter: now.Add(-time.Hour).Format(http.TimeFormat), wantTemporary: true},
		{name: "429 with invalid Retry-After", status: 429, retryAfter: "soon", wantTemporary: true},
		{name: "404", status: 404, body: "404 page not found\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var (
				mu                                  sync.Mutex
				gotMethod, gotPath, gotUA, gotToken string
			)
			srv := newLoopbackServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				gotMethod, gotPath, gotUA, gotToken = r.Method, r.URL.Path, r.UserAgent(), r.Header.Get(accessTokenHeader)
				mu.Unlock()
				if tt.retryAfter != "" {
					w.Header().Set("Retry-After", tt.retryAfter)
				}
				w.WriteHeader(tt.status)
				io.WriteString(w, tt.body)
			}))
			c := newTestBrokerClient(t, srv.URL+"/", func(cfg *brokerConfig) {
				cfg.UserAgent = "health-test/1"
				cfg.Now = func() time.Time { return now }
			})
			err := c.health(t.Context())
			mu.Lock()
			defer mu.Unlock()
			if gotMethod != http.MethodGet || gotPath != healthPath || gotUA != "health-test/1" {
				t.Errorf("request %s %s User-Agent %q; want GET %s health-test/1", gotMethod, gotPath, gotUA, healthPath)
			}
			if gotToken != "" {
				t.Error("the access token was sent to the health endpoint")
			}
			if tt.wantOK {
				if err != nil {
					t.Fatalf("health: %v", err)
				}
				return
			}
			be := asBrokerError(t, err)
			if be.Op != "health" || be.StatusCode != tt.status || be.Body != strings.TrimSpace(tt.body) {
				t.Errorf("got op %q status %d body %q; want health %d %q", be.Op, be.StatusCode, be.Body, tt.status, tt.body)
			}
			if be.Temporary() != tt.wantTemporary || be.RetryAfter != tt.wantRetry {
				t.Errorf("Temporary %v RetryAfter %v; want %v %v", be.Temporary(), be.RetryAfter, tt.wantTemporary, tt.wantRetry)
			}
		})
	}
}

func TestBrokerHealthConnectionRefused(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	c := newTestBrokerClient(t, "http://"+addr, nil)
	be := asBrokerError(t, c.health(t.Context()))
	if be.StatusCode != 0 || !be.Temporary() || be.Unreachable() {
		t.Errorf("status %d Temporary %v Unreachable %v; want 0, true, false", be.StatusCode, be.Temporary(), be.Unreachable())
	}
	var opErr *net.OpError
	if !errors.As(be, &opErr) {
		t.Errorf("%v does not wrap the network error", be)
	}
}

// registration is what the broker's application handler saw.
type registration struct {
	keys      []string
	value     string
	addresses []string
	header    http.Header
}

// decodeRegistration decodes a registration body strictly, as the broker
// does, and records its keys.
func decodeRegistration(t *testing.T, h handledCall) registration {
	t.Helper()
	var raw map[string]json.RawMessage
	if err := json.Unmarshal([]byte(h.body), &raw); err != nil {
		t.Fatalf("body %q: %v", h.body, err)
	}
	reg := registration{header: h.hdr}
	for k := range raw {
		reg.keys = append(reg.keys, k)
	}
	slices.Sort(reg.keys)
	dec := json.NewDecoder(strings.NewReader(h.body))
	dec.DisallowUnknownFields()
	var body struct {
		Value     string   `json:"value"`
		Addresses []string `json:"addresses"`
	}
	if err := dec.Decode(&body); err != nil {
		t.Fatalf("body %q: %v", h.body, err)
	}
	reg.value, reg.addresses = body.Value, body.Addresses
	return reg
}

func TestBrokerRegister(t *testing.T) {
	tests := []struct {
		name      string
		configTok string
		envTok    string
		wantTok   string
	}{
		{"token from the configuration", testAccessToken, "", testAccessToken},
		{"token from FORGE_ACCESS_TOKEN", "", "env-token", "env-token"},
		{"configuration wins over the environment", testAccessToken, "env-token", testAccessToken},
		{"no token", "", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(accessTokenEnv, tt.envTok)
			s := newAuthTestServer(t)
			c := newTestBrokerClient(t, s.srv.URL, func(cfg *brokerConfig) { cfg.AccessToken = tt.configTok })
			if err := c.register(t.Context(), testChallengeValue, testAddrs); err != nil {
				t.Fatalf("register: %v", err)
			}
			h := s.lastHandled()
			reg := decodeRegistration(t, h)
			if want := []string{"addresses", "value"}; !slices.Equal(reg.keys, want) {
				t.Errorf("JSON keys %q, want %q", reg.keys, want)
			}
			wantAddrs := []string{"/ip4/203.0.113.7/tcp/4001", "/ip6/2001:db8::1/udp/4001/quic-v1"}
			if reg.value != testChallengeValue || !slices.Equal(reg.addresses, wantAddrs) {
				t.Errorf("value %q addresses %q; want %q %q", reg.value, reg.addresses, testChallengeValue, wantAddrs)
			}
			if ua := reg.header.Get("User-Agent"); !strings.HasPrefix(ua, modulePath+"@") {
				t.Errorf("User-Agent %q, want the default %s@<version>", ua, modulePath)
			}
			got, present := reg.header[accessTokenHeader]
			if tt.wantTok == "" && present {
				t.Errorf("%s sent (%q) with no token configured", accessTokenHeader, got)
			}
			if tt.wantTok != "" && !slices.Equal(got, []string{tt.wantTok}) {
				t.Errorf("%s = %q, want %q", accessTokenHeader, got, tt.wantTok)
			}
		})
	}
}

func TestBrokerRegisterReusesToken(t *testing.T) {
	s := newAuthTestServer(t)
	c := newTestBrokerClient(t, s.srv.URL, func(cfg *brokerConfig) { cfg.UserAgent = "ua-test" })
	for range 2 {
		if err := c.register(t.Context(), testChallengeValue, testAddrs); err != nil {
			t.Fatalf("register: %v", err)
		}
	}
	if n := s.requests(); n != 3 {
		t.Errorf("%d requests at the broker for two registrations, want 3 (2 + 1)", n)
	}
	if ua := s.lastHandled().hdr.Get("User-Agent"); ua != "ua-test" {
		t.Errorf("User-Agent %q, want the configured one", ua)
	}
}

func TestBrokerRegisterEmptyAddresses(t *testing.T) {
	s := newAuthTestServer(t)
	c := newTestBrokerClient(t, s.srv.URL, nil)
	if err := c.register(t.Context(), testChallengeValue, nil); err != nil {
		t.Fatalf("register: %v", err)
	}
	if body := s.lastHandled().body; body != `{"value":"`+testChallengeValue+`","addresses":[]}` {
		t.Errorf("body %s: want an empty list, not null", body)
	}
	err := c.register(t.Context(), testChallengeValue, []ma.Multiaddr{testAddrs[0], nil})
	if err == nil || s.requests() != 2 {
		t.Errorf("register with an empty address: %v after %d requests; want an error before sending", err, s.requests())
	}
}

func TestBrokerRegisterFailures(t *testing.T) {
	garbage := string([]byte{0xff, 0xfe, 'a', 0x00, '\n', 0xc3}) + strings.Repeat("é", 400) // invalid UTF-8, control bytes, runes across the cut
	tests := []struct {
		name            string
		status          int
		retryAfter      string
		body            string
		wantBody        string // "" to check only the excerpt's bounds
		wantTemporary   bool
		wantUnreachable bool
		wantRetry       time.Duration
	}{
		{
			name: "broker could not dial back", status: 400,
			body:            "error testing addresses: failed to dial: failed to dial 12D3KooW...: all dials failed\n",
			wantBody:        "error testing addresses: failed to dial: failed to dial 12D3KooW...: all dials failed",
			wantUnreachable: true,
		},
		{name: "bad value", status: 400, body: "value is not a base64url of a SHA256 digest\n", wantBody: "value is not a base64url of a SHA256 digest"},
		{name: "forbidden", status: 403, body: "403 Forbidden: Missing Forge-Authorization header.", wantBody: "403 Forbidden: Missing Forge-Authorization header."},
		{name: "rate limited", status: 429, retryAfter: "60", wantTemporary: true, wantRetry: time.Minute},
		{name: "storage failure", status: 500, body: "error storing value: timeout", wantBody: "error storing value: timeout", wantTemporary: true},
		{name: "bad gateway", status: 502, wantTemporary: true},
		{name: "request timeout", status: 408, wantTemporary: true},
		{name: "too early", status: 425, wantTemporary: true},
		{name: "garbage body", status: 500, body: garbage, wantTemporary: true},
		{name: "10 MiB body", status: 400, body: strings.Repeat("x", 10<<20)},
		{name: "token echoed back", status: 403, body: "bad token " + testAccessToken + "!", wantBody: "bad token [redacted]!"},
		{name: "204 is not 200", status: 204},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newAuthTestServer(t)
			s.setApp(func(w http.ResponseWriter, r *http.Request) {
				if tt.retryAfter != "" {
					w.Header().Set("Retry-After", tt.retryAfter)
				}
				w.WriteHeader(tt.status)
				io.WriteString(w, tt.body)
			})
			c := newTestBrokerClient(t, s.srv.URL, nil)
			err := fmt.Errorf("registering the DNS-01 challenge: %w", c.register(t.Context(), testChallengeValue, testAddrs))
			be := asBrokerError(t, err)
			if be.Op != "register" || be.StatusCode != tt.status {
				t.Errorf("op %q status %d, want register %d", be.Op, be.StatusCode, tt.status)
			}
			if be.Err != nil {
				t.Errorf("Err = %v, want nil: the broker answered", be.Err)
			}
			if tt.wantBody != "" && be.Body != tt.wantBody {
				t.Errorf("Body %q, want %q", be.Body, tt.wantBody)
			}
			if len(be.Body) > maxErrorBody || !utf8.ValidString(be.Body) || strings.ContainsAny(be.Body, "\x00\n") {
				t.Errorf("Body is not a clean bounded excerpt: %d bytes %q", len(be.Body), be.Body)
			}
			if tt.body != "" && be.Body == "" {
				t.Error("Body is empty")
			}
			if be.Temporary() != tt.wantTemporary || be.Unreachable() != tt.wantUnreachable || be.RetryAfter != tt.wantRetry {
				t.Errorf("Temporary %v Unreachable %v RetryAfter %v; want %v %v %v",
					be.Temporary(), be.Unreachable(), be.RetryAfter, tt.wantTemporary, tt.wantUnreachable, tt.wantRetry)
			}
			if !strings.HasPrefix(be.Error(), "broker register: "+statusLine(tt.status)) {
				t.Errorf("Error() = %q", be.Error())
			}
		})
	}
}

func TestBrokerRegisterAuthRefused(t *testing.T) {
	// The broker's auth layer answers for another hostname only (400, empty
	// body, before any handshake).
	s := newAuthTestServer(t)
	s.setHostCheck(func(h string) bool { return h == "registration.libp2p.direct" })
	c := newTestBrokerClient(t, s.srv.URL, nil)
	be := asBrokerError(t, c.register(t.Context(), testChallengeValue, testAddrs))
	if be.StatusCode != http.StatusBadRequest || be.Temporary() || be.Unreachable() {
		t.Errorf("status %d Temporary %v Unreachable %v; want 400, false, false", be.StatusCode, be.Temporary(), be.Unreachable())
	}
	if !errors.Is(be, errHandshakeRefused) {
		t.Errorf("Err = %v, want errHandshakeRefused", be.Err)
	}
	if _, _, handled := s.record(); handled != 0 {
		t.Error("the registration reached the application")
	}
}

func TestBrokerRegisterHangingServer(t *testing.T) {
	tests := []struct {
		name          string
		ctx           func(ctx context.Context) (context.Context, context.CancelFunc)
		cancelOnHang  bool // cancel once the broker hangs; otherwise the deadline ends the call
		wantErr       error
		wantTemporary bool
	}{
		{"cancelled by the caller", context.WithCancel, true, context.Canceled, false},
		{"deadline", func(ctx context.Context) (context.Context, context.CancelFunc) {
			return context.WithTimeout(ctx, 200*time.Millisecond)
		}, false, context.DeadlineExceeded, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newAuthTestServer(t)
			reached := make(chan struct{})
			var once sync.Once
			s.setApp(func(w http.ResponseWriter, r *http.Request) {
				once.Do(func() { close(reached) })
				<-r.Context().Done() // hang until the client goes away
			})
			c := newTestBrokerClient(t, s.srv.URL, nil)
			ctx, cancel := tt.ctx(t.Context())
			defer cancel()
			if tt.cancelOnHang {
				go func() { <-reached; cancel() }()
			}
			be := asBrokerError(t, c.register(ctx, testChallengeValue, testAddrs))
			if be.StatusCode != 0 || be.Temporary() != tt.wantTemporary {
				t.Errorf("status %d Temporary %v; want 0, %v (%v)", be.StatusCode, be.Temporary(), tt.wantTemporary, be)
			}
			if !errors.Is(be, tt.wantErr) {
				t.Errorf("%v does not wrap %v", be, tt.wantErr)
			}
		})
	}
}

func TestNewBrokerClient(t *testing.T) {
	key := genTestKey(t)
	tests := []struct {
		endpoint   string
		wantHealth string // "" when an error is expected
		wantErr    string
	}{
		{endpoint: "https://registration.libp2p.direct", wantHealth: "https://registration.libp2p.direct/v1/health"},
		{endpoint: "https://registration.libp2p.direct/", wantHealth: "https://registration.libp2p.direct/v1/health"},
		{endpoint: "HTTP://127.0.0.1:8080/forge//", wantHealth: "http://127.0.0.1:8080/forge/v1/health"},
		{endpoint: "", wantErr: "empty"},
		{endpoint: "registration.libp2p.direct", wantErr: "scheme must be http or https"},
		{endpoint: "ftp://registration.libp2p.direct", wantErr: "scheme must be http or https"},
		{endpoint: "https:///v1", wantErr: "no host"},
		{endpoint: "https://user:hunter2@registration.libp2p.direct", wantErr: "remove the user info"},
		{endpoint: "https://registration.libp2p.direct?x=1", wantErr: "remove the query"},
		{endpoint: "https://registration.libp2p.direct#frag", wantErr: "remove the query and fragment"},
		{endpoint: "https://bad host", wantErr: "parsing broker endpoint"},
	}
	for _, tt := range tests {
		t.Run(tt.endpoint, func(t *testing.T) {
			c, err := newBrokerClient(brokerConfig{Endpoint: tt.endpoint, Key: key})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), "hunter2") {
					t.Errorf("the error shows the password: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.healthURL != tt.wantHealth || c.registerURL != strings.TrimSuffix(tt.wantHealth, healthPath)+registerPath {
				t.Errorf("URLs %s %s, want %s and the registration path beside it", c.healthURL, c.registerURL, tt.wantHealth)
			}
		})
	}
	if _, err := newBrokerClient(brokerConfig{Endpoint: "https://registration.libp2p.direct"}); err == nil {
		t.Error("no error without a key")
	}
}

func TestBrokerClientDefaults(t *testing.T) {
	t.Setenv(accessTokenEnv, "")
	base := &http.Client{}
	c, err := newBrokerClient(brokerConfig{Endpoint: "https://registration.libp2p.direct", Key: genTestKey(t), HTTPClient: base})
	if err != nil {
		t.Fatal(err)
	}
	version, ok := strings.CutPrefix(c.userAgent, modulePath+"@")
	if !ok || version == "" {
		t.Errorf("default User-Agent %q, want %s@<version>", c.userAgent, modulePath)
	}
	if c.accessToken != "" {
		t.Errorf("access token %q, want none", c.accessToken)
	}
	if c.now == nil {
		t.Error("no clock")
	}
	if base.Jar != nil || c.auth.httpClient() == base || c.auth.httpClient().Jar == nil {
		t.Error("the caller's client was modified, or the session has no cookie jar")
	}
}

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

// endingTransport is a caller's transport that records when a round trip
// has ended, after lingering a little on a failure (so that a close that
// did not wait for it would be seen returning first).
type endingTransport struct {
	next  *http.Transport
	ended atomic.Int64
}

func (t *endingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	if err != nil {
		time.Sleep(100 * time.Millisecond)
	}
	t.ended.Add(1)
	return resp, err
}

func (t *endingTransport) CloseIdleConnections() { t.next.CloseIdleConnections() }

func TestBrokerClientClose(t *testing.T) {
	for _, tc := range []struct {
		name   string
		client func() *http.Client // nil: the default
	}{
		{"default client", nil},
		{"caller's client", func() *http.Client {
			return &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
		}},
	} {
		t.Run(tc.name+"/idle connection", func(t *testing.T) {
			s := newAuthTestServer(t)
			s.setBefore(answerHealth)
			c := newTestBrokerClient(t, s.srv.URL, func(cfg *brokerConfig) {
				if tc.client != nil {
					cfg.HTTPClient = tc.client()
				}
			})
			if err := c.health(t.Context()); err != nil {
				t.Fatalf("health: %v", err)
			}
			if opened, open := s.conns.counts(); opened != 1 || open != 1 {
				t.Fatalf("%d connections opened, %d open; want 1 idle", opened, open)
			}
			c.close()
			s.conns.waitAllClosed(t, 10*time.Second)
		})
	}

	t.Run("request in flight", func(t *testing.T) {
		s := newAuthTestServer(t)
		// Two health checks at once leave two connections; the registration
		// then hangs on one of them while the other stays idle.
		var arrived sync.WaitGroup
		arrived.Add(2)
		s.setBefore(func(w http.ResponseWriter, r *http.Request) bool {
			if r.URL.Path != healthPath {
				return false
			}
			arrived.Done()
			arrived.Wait()
			return answerHealth(w, r)
		})
		reached := make(chan struct{})
		s.setApp(func(w http.ResponseWriter, r *http.Request) {
			close(reached)
			<-r.Context().Done() // hang until the client goes away
		})
		tr := &endingTransport{next: http.DefaultTransport.(*http.Transport).Clone()}
		c := newTestBrokerClient(t, s.srv.URL, func(cfg *brokerConfig) { cfg.HTTPClient = &http.Client{Transport: tr} })
		var checks sync.WaitGroup
		for range 2 {
			checks.Go(func() {
				if err := c.health(t.Context()); err != nil {
					t.Errorf("health: %v", err)
				}
			})
		}
		checks.Wait()

		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		errc := make(chan error, 1)
		go func() { errc <- c.register(ctx, testChallengeValue, testAddrs) }()
		select {
		case <-reached:
		case err := <-errc:
			t.Fatalf("register returned before hanging: %v", err)
		}
		roundTrips := tr.ended.Load() // 2 health checks and the handshake's first leg
		cancel()
		c.close()
		if n := tr.ended.Load(); n != roundTrips+1 {
			t.Errorf("close returned with the registration's round trip not ended (%d of %d round trips ended)", n, roundTrips+1)
		}
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Errorf("register: %v, want the cancellation", err)
		}
		s.conns.waitAllClosed(t, 10*time.Second)
		if opened, _ := s.conns.counts(); opened != 2 {
			t.Errorf("%d connections opened, want 2", opened)
		}
	})

	t.Run("calls after close", func(t *testing.T) {
		s := newAuthTestServer(t)
		s.setBefore(answerHealth)
		c := newTestBrokerClient(t, s.srv.URL, nil)
		if err := c.health(t.Context()); err != nil {
			t.Fatalf("health: %v", err)
		}
		c.close()
		c.close() // a second close is harmless
		for name, call := range map[string]func() error{
			"health":   func() error { return c.health(t.Context()) },
			"register": func() error { return c.register(t.Context(), testChallengeValue, testAddrs) },
		} {
			if err := call(); !errors.Is(err, errClientClosed) || !strings.HasPrefix(err.Error(), "broker "+name+": ") {
				t.Errorf("%s after close: %v, want errClientClosed", name, err)
			}
		}
		if n := s.requests(); n != 1 {
			t.Errorf("%d requests at the broker, want only the one before close", n)
		}
		if opened, _ := s.conns.counts(); opened != 1 {
			t.Errorf("%d connections opened, want only the one before close", opened)
		}
		s.conns.waitAllClosed(t, 10*time.Second)
	})
}

func TestBrokerClientCloseConcurrent(t *testing.T) {
	// Calls racing close either complete or fail as closed; once close has
	// returned, nothing is left open (run with -race: no Add after Wait).
	s := newAuthTestServer(t)
	var answered atomic.Int64
	busy := make(chan struct{}) // closed once some calls have been answered
	s.setBefore(func(w http.ResponseWriter, r *http.Request) bool {
		if answered.Add(1) == 20 {
			close(busy)
		}
		return answerHealth(w, r)
	})
	c := newTestBrokerClient(t, s.srv.URL, nil)
	var calls sync.WaitGroup
	start := make(chan struct{})
	for range 8 {
		calls.Go(func() {
			<-start
			for {
				err := c.health(t.Context())
				if errors.Is(err, errClientClosed) {
					return
				}
				if err != nil {
					t.Errorf("health: %v", err)
					return
				}
			}
		})
	}
	close(start)
	select {
	case <-busy:
	case <-time.After(10 * time.Second):
		t.Fatal("the calls did not reach the broker")
	}
	c.close()
	s.conns.waitAllClosed(t, 10*time.Second)
	calls.Wait()
}

// answerHealth is a before-hook answering health checks with 204.
func answerHealth(w http.ResponseWriter, r *http.Request) bool {
	if r.URL.Path != healthPath {
		return false
	}
	w.WriteHeader(http.StatusNoContent)
	return true
}
