package autotls

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// requestLog records every request a server receives, headers and body.
type requestLog struct {
	mu    sync.Mutex
	dumps [][]byte
}

func (l *requestLog) record(t *testing.T, r *http.Request) {
	dump, err := httputil.DumpRequest(r, true)
	if err != nil {
		t.Errorf("dumping request: %v", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.dumps = append(l.dumps, dump)
}

func (l *requestLog) all() [][]byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.dumps)
}

// newRedirectTarget starts a loopback server (HTTPS if useTLS) that answers
// like a healthy broker and must receive nothing.
func newRedirectTarget(t *testing.T, useTLS bool) (*httptest.Server, *requestLog) {
	t.Helper()
	log := new(requestLog)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		log.record(t, r)
		if r.URL.Path == healthPath {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		io.WriteString(w, "ok")
	})
	if useTLS {
		return newLoopbackTLSServer(t, h), log
	}
	return newLoopbackServer(t, h), log
}

// following is a CheckRedirect that follows every redirect.
func following(*http.Request, []*http.Request) error { return nil }

func TestBrokerRedirectNotFollowed(t *testing.T) {
	// Where the endpoint redirects, and the call that meets it.
	type place struct {
		name string
		path string
		// arm makes s redirect with redirect; it may make calls of its own
		// first (they must succeed).
		arm  func(t *testing.T, s *authTestServer, c *brokerClient, redirect http.HandlerFunc)
		call func(t *testing.T, c *brokerClient) error
	}
	health := func(t *testing.T, c *brokerClient) error { return c.health(t.Context()) }
	register := func(t *testing.T, c *brokerClient) error {
		return c.register(t.Context(), testChallengeValue, testAddrs)
	}
	places := []place{
		{name: "health", path: healthPath, call: health,
			arm: func(t *testing.T, s *authTestServer, c *brokerClient, redirect http.HandlerFunc) {
				s.setBefore(func(w http.ResponseWriter, r *http.Request) bool { redirect(w, r); return true })
			}},
		{name: "register, before the handshake", path: registerPath, call: register,
			arm: func(t *testing.T, s *authTestServer, c *brokerClient, redirect http.HandlerFunc) {
				s.setBefore(func(w http.ResponseWriter, r *http.Request) bool { redirect(w, r); return true })
			}},
		{name: "register, completing the handshake", path: registerPath, call: register,
			arm: func(t *testing.T, s *authTestServer, c *brokerClient, redirect http.HandlerFunc) {
				s.setApp(redirect)
			}},
		{name: "register, with a bearer token", path: registerPath, call: register,
			arm: func(t *testing.T, s *authTestServer, c *brokerClient, redirect http.HandlerFunc) {
				if err := register(t, c); err != nil {
					t.Fatalf("first registration: %v", err)
				}
				s.setApp(redirect)
			}},
	}
	statuses := []int{
		http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther,
		http.StatusTemporaryRedirect, http.StatusPermanentRedirect,
	}
	for _, endpointTLS := range []bool{false, true} {
		for _, targetTLS := range []bool{false, true} {
			if targetTLS && !endpointTLS {
				continue // an https target says nothing more to an http endpoint
			}
			for _, follows := range []bool{false, true} {
				for _, p := range places {
					for _, status := range statuses {
						name := strings.Join([]string{scheme(endpointTLS) + " to " + scheme(targetTLS),
							map[bool]string{false: "default client", true: "client that follows"}[follows],
							p.name, strconv.Itoa(status)}, "/")
						t.Run(name, func(t *testing.T) {
							target, targetLog := newRedirectTarget(t, targetTLS)
							var s *authTestServer
							if endpointTLS {
								s = newAuthTestServerTLS(t)
							} else {
								s = newAuthTestServer(t)
							}
							var user *http.Client
							if endpointTLS {
								user = s.srv.Client() // trusts every httptest certificate, and follows redirects
							}
							if follows {
								if user == nil {
									user = &http.Client{}
								}
								user.CheckRedirect = following
							}
							var userTransport http.RoundTripper
							if user != nil {
								userTransport = user.Transport
							}
							c := newTestBrokerClient(t, s.srv.URL, func(cfg *brokerConfig) { cfg.HTTPClient = user })
							location := target.URL + p.path
							p.arm(t, s, c, func(w http.ResponseWriter, r *http.Request) {
								http.Redirect(w, r, location, status)
							})

							be := asBrokerError(t, p.call(t, c))
							if be.StatusCode != status || be.Location != location || be.Err != nil {
								t.Errorf("status %d Location %q Err %v; want %d %q nil", be.StatusCode, be.Location, be.Err, status, location)
							}
							if be.Temporary() || be.Unreachable() {
								t.Errorf("Temporary %v Unreachable %v, want false false", be.Temporary(), be.Unreachable())
							}
							if text := be.Error(); !strings.Contains(text, statusLine(status)) || !strings.Contains(text, location) || !strings.Contains(text, "WithRegistrationEndpoint") {
								t.Errorf("Error() = %q: want the status, the Location and the option to set", text)
							}

							if got := targetLog.all(); len(got) != 0 {
								t.Fatalf("the redirect target received %d requests, the first:\n%s", len(got), got[0])
							}
							// The endpoint did get the token (with a registration), so
							// the target's silence is what kept it.
							dumps, _, _ := s.record()
							sentToken := slices.ContainsFunc(dumps, func(d []byte) bool { return strings.Contains(string(d), testAccessToken) })
							if sentToken != (p.path == registerPath) {
								t.Errorf("access token sent to the endpoint: %v, want %v", sentToken, p.path == registerPath)
							}
							if user != nil && (user.Transport != userTransport || follows && user.CheckRedirect == nil) {
								t.Error("the caller's client was modified")
							}
						})
					}
				}
			}
		}
	}
}

func scheme(useTLS bool) string {
	if useTLS {
		return "https"
	}
	return "http"
}

func TestBrokerRedirectRelativeLocation(t *testing.T) {
	// A relative Location is named resolved, and a password in it hidden.
	for _, tc := range []struct{ location, want string }{
		{"/elsewhere/v1/health", "/elsewhere/v1/health"}, // prefixed with the server's URL below
		{"http://user:hunter2@127.0.0.1:1/v1/health", "http://user:xxxxx@127.0.0.1:1/v1/health"},
		{"http://127.0.0.1:1/?t=" + testAccessToken, "http://127.0.0.1:1/?t=[redacted]"},
	} {
		t.Run(tc.location, func(t *testing.T) {
			srv := newLoopbackServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Location", tc.location)
				w.WriteHeader(http.StatusFound)
			}))
			c := newTestBrokerClient(t, srv.URL, nil)
			be := asBrokerError(t, c.health(t.Context()))
			want := tc.want
			if strings.HasPrefix(want, "/") {
				want = srv.URL + want
			}
			if be.Location != want || strings.Contains(be.Error(), "hunter2") {
				t.Errorf("Location %q (error %q), want %q", be.Location, be.Error(), want)
			}
		})
	}
}

func TestBrokerEndpointGuard(t *testing.T) {
	endpoint, err := url.Parse("https://registration.example/forge")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		url  string
		want bool
	}{
		{"https://registration.example/forge/v1/health", true},
		{"https://REGISTRATION.example/forge/v1/_acme-challenge?x=1", true},
		{"http://registration.example/forge/v1/health", false},
		{"https://registration.example:8443/forge/v1/health", false},
		{"https://registration.example.evil/forge/v1/health", false},
		{"https://evil.example/forge/v1/health", false},
		{"https://user@registration.example/forge/v1/health", false},
		{"https://registration.example/forge", false},
		{"https://registration.example/forgery/v1/health", false},
		{"https://registration.example/other/v1/health", false},
		{"https://registration.example/forge/../other", false},
		{"https://registration.example/forge/./v1/health", false},
	} {
		u, err := url.Parse(tc.url)
		if err != nil {
			t.Fatal(err)
		}
		if got := underEndpoint(endpoint, u); got != tc.want {
			t.Errorf("underEndpoint(%s) = %v, want %v", tc.url, got, tc.want)
		}
	}

	// Whatever sends through the client's session (a plain request, or a
	// PeerID-authenticated one with the access token), a URL elsewhere is
	// refused before anything is sent.
	other, otherLog := newRedirectTarget(t, false)
	s := newAuthTestServer(t)
	c := newTestBrokerClient(t, s.srv.URL, nil)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, other.URL+healthPath, nil)
	resp, plainErr := c.auth.httpClient().Do(req)
	if resp != nil {
		resp.Body.Close()
	}
	if !errors.Is(plainErr, errOffEndpoint) {
		t.Errorf("plain request elsewhere: %v, want errOffEndpoint", plainErr)
	}
	if be := (&BrokerError{Op: "health", Err: plainErr}); be.Temporary() {
		t.Errorf("a refused request counts as temporary: %v", be)
	}
	req, _ = http.NewRequestWithContext(t.Context(), http.MethodPost, other.URL+registerPath, strings.NewReader("{}"))
	req.Header.Set(accessTokenHeader, testAccessToken)
	if _, resp, err := c.auth.do(req); !errors.Is(err, errOffEndpoint) {
		if resp != nil {
			resp.Body.Close()
		}
		t.Errorf("authenticated request elsewhere: %v, want errOffEndpoint", err)
	}
	if n := len(otherLog.all()); n != 0 {
		t.Errorf("the other server received %d requests", n)
	}
	if s.requests() != 0 {
		t.Errorf("the endpoint received %d requests", s.requests())
	}
	// The client still works for its endpoint.
	if err := c.register(t.Context(), testChallengeValue, testAddrs); err != nil {
		t.Fatalf("register: %v", err)
	}
}
