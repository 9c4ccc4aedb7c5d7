package testforge

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	httppeeridauth "github.com/libp2p/go-libp2p/p2p/http/auth"
)

// client registers with a forge's broker as a host would.
type client struct {
	f    *Forge
	auth *httppeeridauth.ClientPeerIDAuth
	http *http.Client
}

func newClient(f *Forge, key crypto.PrivKey) *client {
	return &client{
		f:    f,
		auth: &httppeeridauth.ClientPeerIDAuth{PrivKey: key},
		http: &http.Client{Transport: &http.Transport{}},
	}
}

type response struct {
	status int
	body   string
	header http.Header
}

// do sends an authenticated request to /v1/_acme-challenge.
func (c *client) do(t testing.TB, method string, body []byte, header http.Header) response {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, c.f.BrokerURL+challengePath, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	_, resp, err := c.auth.AuthenticatedDo(c.http, req)
	if err != nil {
		t.Fatalf("AuthenticatedDo: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{resp.StatusCode, string(b), resp.Header}
}

func registrationBody(t testing.TB, value string, h host.Host) []byte {
	t.Helper()
	var addrs []string
	if h != nil {
		for _, a := range h.Addrs() {
			addrs = append(addrs, a.String())
		}
	}
	b, err := json.Marshal(map[string]any{"value": value, "addresses": addrs})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// plain sends an unauthenticated request.
func plain(t *testing.T, method, url string, setHost string) response {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if setHost != "" {
		req.Host = setHost
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return response{resp.StatusCode, string(b), resp.Header}
}

func TestBrokerHealthAndRoutes(t *testing.T) {
	f := startForge(t, Config{})
	for _, method := range []string{http.MethodGet, http.MethodPost, http.MethodHead, http.MethodPut} {
		if r := plain(t, method, f.BrokerURL+healthPath, ""); r.status != http.StatusNoContent {
			t.Errorf("%s /v1/health = %d, want 204", method, r.status)
		}
	}
	for _, path := range []string{"/v1/health/", "/v1/_acme-challenge/", "/", "/v1"} {
		r := plain(t, http.MethodGet, f.BrokerURL+path, "")
		if r.status != http.StatusNotFound || r.body != "404 page not found\n" {
			t.Errorf("GET %s = %d %q, want 404", path, r.status, r.body)
		}
	}
	if got := f.Stats().Health; got != 4 {
		t.Errorf("Stats().Health = %d, want 4", got)
	}
}

func TestBrokerRegistration(t *testing.T) {
	f := startForge(t, Config{})
	key, id := seededKey(t, 2)
	h := newHost(t, f, key)
	c := newClient(f, key)
	value := digest("first")

	r := c.do(t, http.MethodPost, registrationBody(t, value, h), nil)
	if r.status != http.StatusOK || r.body != "" {
		t.Fatalf("registration = %d %q, want 200 with empty body", r.status, r.body)
	}
	if got, ok := f.TXT(id); !ok || got != value {
		t.Fatalf("TXT = %q, %v; want %q", got, ok, value)
	}
	txts, err := f.Resolver().LookupTXT(t.Context(), "_acme-challenge."+PeerLabel(id)+"."+f.Domain)
	if err != nil || !slices.Equal(txts, []string{value}) {
		t.Fatalf("LookupTXT = %v, %v; want [%s]", txts, err, value)
	}
	st := f.Stats()
	if st.Challenge != 2 || st.Registered != 1 {
		t.Errorf("after first registration Stats = %+v, want Challenge 2 (both handshake legs), Registered 1", st)
	}

	// The second registration reuses the bearer token (one request), and
	// the last writer wins.
	value2 := digest("second")
	if r := c.do(t, http.MethodPost, registrationBody(t, value2, h), nil); r.status != http.StatusOK {
		t.Fatalf("second registration = %d %q", r.status, r.body)
	}
	if got, _ := f.TXT(id); got != value2 {
		t.Fatalf("TXT after overwrite = %q, want %q", got, value2)
	}
	st = f.Stats()
	if st.Challenge != 3 || st.Registered != 2 {
		t.Errorf("after second registration Stats = %+v, want Challenge 3, Registered 2", st)
	}
}

func TestBrokerErrors(t *testing.T) {
	f := startForge(t, Config{})
	key, id := seededKey(t, 2)
	h := newHost(t, f, key)
	c := newClient(f, key)

	// A loopback port with nothing listening.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := "/ip4/127.0.0.1/tcp/" + portOf(ln.Addr()) + "/p2p/" + id.String()
	_ = ln.Close()

	raw := func(s string) []byte { return []byte(s) }
	v := digest("x")
	short := base64.RawURLEncoding.EncodeToString(make([]byte, 31))
	tests := []struct {
		name       string
		method     string
		body       []byte
		status     int
		body200    string // exact body
		bodyPrefix string // or a prefix of it
	}{
		{"GET", http.MethodGet, nil, 400, "400 Bad Request: Only POST method is allowed.\n", ""},
		{"bad JSON", http.MethodPost, raw(`{"value":`), 400, "", "error decoding body: "},
		{"empty body", http.MethodPost, nil, 400, "error decoding body: EOF", ""},
		{"unknown field", http.MethodPost, raw(`{"value":"` + v + `","addresses":[],"peer":"x"}`), 400, `error decoding body: json: unknown field "peer"`, ""},
		{"padded value", http.MethodPost, raw(`{"value":"` + v + `=","addresses":[]}`), 400, "", "error decoding value as base64url: "},
		{"31-byte value", http.MethodPost, raw(`{"value":"` + short + `","addresses":[]}`), 400, "value is not a base64url of a SHA256 digest", ""},
		{"no addresses", http.MethodPost, raw(`{"value":"` + v + `","addresses":[]}`), 400, "", "error testing addresses: failed to dial: "},
		{"bad multiaddr", http.MethodPost, raw(`{"value":"` + v + `","addresses":["/ip4/nope"]}`), 400, "", "error testing addresses: "},
		{"unreachable", http.MethodPost, raw(`{"value":"` + v + `","addresses":["` + closedAddr + `"]}`), 400, "", "error testing addresses: failed to dial: "},
		{"body too large", http.MethodPost, bytes.Repeat([]byte(" "), maxBodySize+1), 500, "error reading body: http: request body too large", ""},
		{"non-loopback refused", http.MethodPost, raw(`{"value":"` + v + `","addresses":["/ip4/192.0.2.1/tcp/4001"]}`), 400, "", "error testing addresses: failed to dial: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := c.do(t, tt.method, tt.body, nil)
			if r.status != tt.status {
				t.Fatalf("status = %d (%q), want %d", r.status, r.body, tt.status)
			}
			if tt.body200 != "" && r.body != tt.body200 {
				t.Errorf("body = %q, want %q", r.body, tt.body200)
			}
			if tt.bodyPrefix != "" && !hasPrefix(r.body, tt.bodyPrefix) {
				t.Errorf("body = %q, want prefix %q", r.body, tt.bodyPrefix)
			}
		})
	}
	if _, ok := f.TXT(id); ok {
		t.Fatal("a failed registration stored a value")
	}
	if st := f.Stats(); st.Registered != 0 {
		t.Fatalf("Stats().Registered = %d after failures only", st.Registered)
	}

	t.Run("wrong peer at address", func(t *testing.T) {
		// The host is reachable, but it is not the authenticated peer.
		otherKey, _ := seededKey(t, 9)
		other := newClient(f, otherKey)
		r := other.do(t, http.MethodPost, registrationBody(t, v, h), nil)
		if r.status != 400 || !hasPrefix(r.body, "error testing addresses: ") {
			t.Fatalf("= %d %q, want 400 error testing addresses", r.status, r.body)
		}
	})

	t.Run("no authorization", func(t *testing.T) {
		r := plain(t, http.MethodPost, f.BrokerURL+challengePath, "")
		if r.status != http.StatusUnauthorized || r.header.Get("WWW-Authenticate") == "" {
			t.Fatalf("= %d, WWW-Authenticate %q; want 401 with a challenge", r.status, r.header.Get("WWW-Authenticate"))
		}
	})

	t.Run("wrong host", func(t *testing.T) {
		// Hostname binding: only the broker's own host:port is accepted.
		for _, host := range []string{"registration.libp2p.direct", "localhost:" + portOf(f.broker.srv.Listener.Addr())} {
			r := plain(t, http.MethodPost, f.BrokerURL+challengePath, host)
			if r.status != http.StatusBadRequest || r.body != "" {
				t.Errorf("Host %s: = %d %q, want 400 with empty body", host, r.status, r.body)
			}
		}
	})
}

func TestBrokerAccessToken(t *testing.T) {
	const token = "s3cret"
	f := startForge(t, Config{AccessToken: token})
	key, id := seededKey(t, 2)
	h := newHost(t, f, key)
	c := newClient(f, key)
	body := registrationBody(t, digest("token"), h)

	for name, header := range map[string]http.Header{
		"missing": nil,
		"wrong":   {ForgeAuthHeader: {"nope"}},
	} {
		r := c.do(t, http.MethodPost, body, header)
		if r.status != http.StatusForbidden || r.body != "403 Forbidden: Missing Forge-Authorization header." {
			t.Errorf("%s token: = %d %q, want 403", name, r.status, r.body)
		}
	}
	r := c.do(t, http.MethodPost, body, http.Header{ForgeAuthHeader: {token}})
	if r.status != http.StatusOK {
		t.Fatalf("with token: = %d %q, want 200", r.status, r.body)
	}
	if _, ok := f.TXT(id); !ok {
		t.Fatal("value not stored")
	}
}

func TestBrokerFault(t *testing.T) {
	f := startForge(t, Config{})
	f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != healthPath {
			return false
		}
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(http.StatusServiceUnavailable)
		return true
	})
	r := plain(t, http.MethodGet, f.BrokerURL+healthPath, "")
	if r.status != http.StatusServiceUnavailable || r.header.Get("Retry-After") != "7" {
		t.Fatalf("faulted health = %d, Retry-After %q", r.status, r.header.Get("Retry-After"))
	}
	if r := plain(t, http.MethodGet, f.BrokerURL+"/nope", ""); r.status != http.StatusNotFound {
		t.Fatalf("unfaulted path = %d, want 404", r.status)
	}
	f.SetBrokerFault(nil)
	if r := plain(t, http.MethodGet, f.BrokerURL+healthPath, ""); r.status != http.StatusNoContent {
		t.Fatalf("health after removing the fault = %d, want 204", r.status)
	}
	if got := f.Stats().Health; got != 2 {
		t.Fatalf("Stats().Health = %d, want 2 (faulted requests count too)", got)
	}
}

func portOf(a net.Addr) string {
	_, port, _ := net.SplitHostPort(a.String())
	return port
}

// Close aborts a dial-back stuck on an address that accepts but never
// answers, rather than waiting for libp2p's timeouts.
func TestCloseAbortsDialBack(t *testing.T) {
	f := New(t, Config{})
	key, id := seededKey(t, 2)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	held := make(chan net.Conn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			held <- c // never speaks
		}
	}()
	body := []byte(`{"value":"` + digest("x") + `","addresses":["/ip4/127.0.0.1/tcp/` + portOf(ln.Addr()) + `"]}`)

	c := newClient(f, key)
	req, err := http.NewRequest(http.MethodPost, f.BrokerURL+challengePath, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, resp, err := c.auth.AuthenticatedDo(c.http, req)
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	var conn net.Conn
	select {
	case conn = <-held:
		defer conn.Close()
	case err := <-done:
		t.Fatalf("request ended before the dial-back reached the listener: %v", err)
	}

	closed := make(chan error, 1)
	go func() { closed <- f.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close blocked behind a dial-back")
	}
	<-done
	if _, ok := f.TXT(id); ok {
		t.Fatal("an aborted registration stored a value")
	}
}
