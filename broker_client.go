package autotls

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	ma "github.com/multiformats/go-multiaddr"
)

const (
	// modulePath is this module's path, the default User-Agent's prefix.
	modulePath = "github.com/p2ptls/autotls"

	// accessTokenEnv names the environment variable read for the broker's
	// access token when none is configured.
	accessTokenEnv = "FORGE_ACCESS_TOKEN"
	// accessTokenHeader carries the access token to the broker.
	accessTokenHeader = "Forge-Authorization"

	healthPath   = "/v1/health"
	registerPath = "/v1/_acme-challenge"

	// healthTimeout bounds a health check, as the reference client does.
	healthTimeout = 15 * time.Second
	// registerTimeout bounds a registration. The broker dials the host back
	// before answering (libp2p allows that dial a minute, plus 5 s for
	// identify), so this is longer than a plain request needs.
	registerTimeout = 75 * time.Second

	// maxResponseBody bounds how much of a broker response is read.
	maxResponseBody = 64 << 10
	// maxErrorBody bounds the excerpt of a response body kept in a
	// [BrokerError].
	maxErrorBody = 512
	// maxRetryAfter caps a Retry-After delay: beyond it the header is more
	// likely a mistake than advice.
	maxRetryAfter = 7 * 24 * time.Hour
)

// brokerConfig configures a [brokerClient].
type brokerConfig struct {
	// Endpoint is the broker's base URL, e.g.
	// "https://registration.libp2p.direct": an absolute http or https URL
	// with a host and no user info, query or fragment; trailing slashes are
	// ignored.
	Endpoint string
	// Key is the host's identity key, used to sign the PeerID
	// authentication (it is never sent). Required.
	Key crypto.PrivKey
	// HTTPClient sends the requests; nil means a client with a 90 s timeout
	// per request and a transport of its own (a clone of
	// [http.DefaultTransport]). Each call is bounded by its context and by a
	// deadline of its own (15 s for health, 75 s for register). The client is
	// not modified: a copy is used, with a cookie jar (a fresh one if it has
	// none), which never follows redirects and refuses to send anything
	// outside Endpoint. [brokerClient.close] closes the idle connections of
	// its transport.
	HTTPClient *http.Client
	// UserAgent is sent with every request; "" means
	// "github.com/p2ptls/autotls@<module version>".
	UserAgent string
	// AccessToken is sent in the Forge-Authorization header of
	// registrations; "" means the FORGE_ACCESS_TOKEN environment variable,
	// read once by newBrokerClient; if both are empty the header is not sent.
	AccessToken string
	// Now tells the time, for Retry-After dates; nil means [time.Now].
	Now func() time.Time
}

// brokerClient talks to a p2p-forge registration broker: its health check
// and the registration of DNS-01 challenges. It owns one PeerID-auth session,
// so registrations after the first reuse its bearer token.
//
// Every request goes to the endpoint and nowhere else: redirects are not
// followed (a 3xx is a *[BrokerError] with its Location) and the transport
// refuses a request whose URL is not under the endpoint, so neither the
// access token nor the PeerID-auth headers can reach another origin.
//
// A brokerClient is safe for concurrent use. Once closed, it sends nothing.
type brokerClient struct {
	healthURL   string
	registerURL string
	auth        *peerIDAuth
	userAgent   string
	accessToken string
	now         func() time.Time

	mu       sync.Mutex
	closed   bool           // set by close; no call starts after it
	inFlight sync.WaitGroup // calls started and not yet returned; Add only under mu while !closed
}

// errClientClosed is wrapped by the error of a call made after
// [brokerClient.close].
var errClientClosed = errors.New("broker client closed")

// errOffEndpoint is wrapped by the error of a request refused because its URL
// is not under the broker endpoint.
var errOffEndpoint = errors.New("request not for the broker endpoint")

// newBrokerClient validates cfg and returns a client for its broker.
func newBrokerClient(cfg brokerConfig) (*brokerClient, error) {
	base, err := parseEndpoint(cfg.Endpoint)
	if err != nil {
		return nil, err
	}
	if cfg.Key == nil {
		return nil, errors.New("broker client: no identity key")
	}
	endpoint, err := url.Parse(base)
	if err != nil { // parseEndpoint has parsed it already
		return nil, fmt.Errorf("parsing broker endpoint: %w", err)
	}
	var hc http.Client
	if cfg.HTTPClient != nil {
		hc = *cfg.HTTPClient // newPeerIDAuth copies it again and refuses redirects
	} else {
		hc.Timeout = defaultHTTPTimeout
		if tr, ok := http.DefaultTransport.(*http.Transport); ok {
			hc.Transport = tr.Clone() // ours alone, so close can close its connections
		}
	}
	hc.Transport = &endpointTransport{endpoint: endpoint, next: hc.Transport}
	c := &brokerClient{
		healthURL:   base + healthPath,
		registerURL: base + registerPath,
		auth:        newPeerIDAuth(cfg.Key, &hc),
		userAgent:   cfg.UserAgent,
		accessToken: cfg.AccessToken,
		now:         cfg.Now,
	}
	if c.userAgent == "" {
		c.userAgent = defaultUserAgent()
	}
	if c.accessToken == "" {
		c.accessToken = os.Getenv(accessTokenEnv)
	}
	if c.now == nil {
		c.now = time.Now
	}
	return c, nil
}

// parseEndpoint checks a broker base URL and returns it without trailing
// slashes.
func parseEndpoint(endpoint string) (string, error) {
	if endpoint == "" {
		return "", errors.New("broker endpoint is empty: set it to the broker's base URL, e.g. https://registration.libp2p.direct")
	}
	u, err := url.Parse(endpoint)
	if err != nil {
		return "", fmt.Errorf("parsing broker endpoint: %w", err)
	}
	shown := u.Redacted()
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return "", fmt.Errorf("broker endpoint %q: the scheme must be http or https, e.g. https://registration.libp2p.direct", shown)
	case u.Host == "":
		return "", fmt.Errorf("broker endpoint %q: no host; use an absolute URL such as https://registration.libp2p.direct", shown)
	case u.User != nil:
		return "", fmt.Errorf("broker endpoint %q: remove the user info; configure the access token instead", shown)
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "":
		return "", fmt.Errorf("broker endpoint %q: remove the query and fragment; the endpoint is a base URL to which /v1/... paths are appended", shown)
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// defaultUserAgent returns "github.com/p2ptls/autotls@<version>", the version
// being the module's from the build information, or "(devel)".
func defaultUserAgent() string {
	version := "(devel)"
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Path == modulePath && bi.Main.Version != "" {
			version = bi.Main.Version
		}
		for _, dep := range bi.Deps {
			if dep.Path == modulePath && dep.Version != "" {
				version = dep.Version
			}
		}
	}
	return modulePath + "@" + version
}

// underEndpoint reports whether u is endpoint or below it: the same scheme
// and host, no user info, and a path under endpoint's without "." or ".."
// segments.
func underEndpoint(endpoint, u *url.URL) bool {
	if u == nil || u.User != nil || !strings.EqualFold(u.Scheme, endpoint.Scheme) || !strings.EqualFold(u.Host, endpoint.Host) {
		return false
	}
	for seg := range strings.SplitSeq(u.Path, "/") {
		if seg == "." || seg == ".." {
			return false
		}
	}
	return strings.HasPrefix(u.EscapedPath(), endpoint.EscapedPath()+"/")
}

// endpointTransport sends only requests under the broker endpoint, and
// refuses the others before anything is sent: it is the one place every
// request of a [brokerClient] passes through (both legs of a handshake
// included), so no code path can send the access token or the PeerID-auth
// headers elsewhere.
type endpointTransport struct {
	endpoint *url.URL
	next     http.RoundTripper // nil means http.DefaultTransport
}

// RoundTrip implements [http.RoundTripper].
func (t *endpointTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if !underEndpoint(t.endpoint, req.URL) {
		if req.Body != nil {
			req.Body.Close() // a RoundTripper closes the body, even on error
		}
		return nil, fmt.Errorf("%w %s: refusing to send to %s", errOffEndpoint, t.endpoint.Redacted(), req.URL.Redacted())
	}
	return t.transport().RoundTrip(req)
}

// CloseIdleConnections closes the idle connections of the underlying
// transport, if it can.
func (t *endpointTransport) CloseIdleConnections() {
	if ci, ok := t.transport().(interface{ CloseIdleConnections() }); ok {
		ci.CloseIdleConnections()
	}
}

func (t *endpointTransport) transport() http.RoundTripper {
	if t.next == nil {
		return http.DefaultTransport
	}
	return t.next
}

// begin registers a call about to start, or returns an error wrapping
// [errClientClosed] if the client is closed. A nil error must be matched by a
// call to c.inFlight.Done.
func (c *brokerClient) begin(op string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fmt.Errorf("broker %s: %w", op, errClientClosed)
	}
	c.inFlight.Add(1)
	return nil
}

// close makes every later call fail at once, waits for the calls in flight to
// return, and then closes the idle connections of the client's transport, so
// that no connection to the broker outlives it. A call returns when its
// context ends (or at its own deadline, 15 s for health and 75 s for
// register): cancel the contexts first. Calling close again does nothing
// more.
func (c *brokerClient) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.inFlight.Wait()
	c.auth.httpClient().CloseIdleConnections()
}

// health asks the broker whether it is up (GET <endpoint>/v1/health). It
// returns nil iff the broker answers 204 No Content, and a *[BrokerError]
// otherwise.
func (c *brokerClient) health(ctx context.Context) error {
	if err := c.begin("health"); err != nil {
		return err
	}
	defer c.inFlight.Done()
	ctx, cancel := context.WithTimeout(ctx, healthTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.healthURL, nil)
	if err != nil {
		return fmt.Errorf("broker health: building request: %w", err)
	}
	req.Header.Set("User-Agent", c.userAgent)
	resp, err := c.auth.httpClient().Do(req)
	if err != nil {
		return &BrokerError{Op: "health", Err: err}
	}
	return c.check("health", resp, nil, http.StatusNoContent)
}

// registerRequest is the body of a registration, exactly as the broker
// expects it (it rejects unknown keys).
type registerRequest struct {
	Value     string   `json:"value"`
	Addresses []string `json:"addresses"`
}

// register asks the broker to publish value (the DNS-01 key authorization
// digest) as the TXT record _acme-challenge.<peerid>.<forge-domain> of the
// host, after dialing it back at one of addrs (POST
// <endpoint>/v1/_acme-challenge, PeerID-authenticated). It returns nil iff
// the broker answers 200 OK, and a *[BrokerError] if the call failed; an
// empty address is refused before anything is sent.
func (c *brokerClient) register(ctx context.Context, value string, addrs []ma.Multiaddr) error {
	if err := c.begin("register"); err != nil {
		return err
	}
	defer c.inFlight.Done()
	body := registerRequest{Value: value, Addresses: make([]string, 0, len(addrs))}
	for i, a := range addrs {
		if len(a) == 0 {
			return fmt.Errorf("broker register: address %d is empty", i)
		}
		body.Addresses = append(body.Addresses, a.String())
	}
	payload, err := json.Marshal(body)
	if err != nil {
		return fmt.Errorf("broker register: encoding request: %w", err)
	}

	ctx, cancel := context.WithTimeout(ctx, registerTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.registerURL, bytes.NewReader(payload))
	if err != nil {
		return fmt.Errorf("broker register: building request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", c.userAgent)
	if c.accessToken != "" {
		req.Header.Set(accessTokenHeader, c.accessToken)
	}
	_, resp, err := c.auth.do(req)
	if resp == nil {
		return &BrokerError{Op: "register", Err: err}
	}
	return c.check("register", resp, err, http.StatusOK)
}

// check reads and closes resp and returns nil if its status is want and err
// is nil, and a *[BrokerError] otherwise.
func (c *brokerClient) check(op string, resp *http.Response, err error, want int) error {
	body, readErr := io.ReadAll(io.LimitReader(resp.Body, maxResponseBody))
	resp.Body.Close()
	if err == nil && resp.StatusCode == want {
		return nil // the status is the answer; a body read error does not change it
	}
	if err == nil && readErr != nil {
		err = fmt.Errorf("reading response body: %w", readErr)
	}
	retryAfter, _ := parseRetryAfter(resp.Header.Get("Retry-After"), c.now())
	be := &BrokerError{
		Op:         op,
		StatusCode: resp.StatusCode,
		Body:       excerpt(body, c.accessToken),
		RetryAfter: retryAfter,
		Err:        err,
	}
	if be.Location = redirectLocation(resp, c.accessToken); be.Location != "" {
		// The redirect is why the call failed (and why a handshake it
		// interrupted did not complete).
		be.Err = nil
	}
	return be
}

// redirectLocation returns where resp redirects to, if it is a 3xx with a
// Location: resolved against the request's URL (with any password hidden)
// when it parses, and cleaned like a body excerpt (secret replaced, at most
// [maxErrorBody] bytes). It returns "" otherwise.
func redirectLocation(resp *http.Response, secret string) string {
	if resp.StatusCode < 300 || resp.StatusCode > 399 || resp.Header.Get("Location") == "" {
		return ""
	}
	loc := resp.Header.Get("Location")
	if u, err := resp.Location(); err == nil {
		loc = u.Redacted()
	}
	return excerpt([]byte(loc), secret)
}

// excerpt returns at most [maxErrorBody] bytes of b as trimmed, valid UTF-8
// with control characters replaced by spaces, and secret (if non-empty)
