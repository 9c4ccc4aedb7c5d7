package autotls

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
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
