package autotls

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	httppeeridauth "github.com/libp2p/go-libp2p/p2p/http/auth"
)

const (
	// defaultHTTPTimeout bounds every HTTP request of a client made for us
	// (one handshake leg or one plain request). It is a safety net: callers
	// bound each operation with a context deadline of their own. It is long
	// enough for the broker's dial-back, which runs inside the registration
	// request and may take up to a minute when addresses do not answer.
	defaultHTTPTimeout = 90 * time.Second

	// peerIDAuthTokenTTL is how long a bearer token is reused before the
	// session starts a fresh handshake on its own. p2p-forge issues tokens
	// valid for one hour; dropping ours a little earlier turns an expired-token
	// retry (a rejected request, then a 2-leg server-initiated handshake during
	// which go-libp2p's server calls the handler with an empty body) into the
	// cheaper 2-leg client-initiated handshake.
	peerIDAuthTokenTTL = 55 * time.Minute

	// maxReplayBody bounds the request body do buffers to make it replayable.
	maxReplayBody = 1 << 20

	// maxDrain bounds how much of a response body is read when it is closed
	// unread (so that the connection can be reused) and kept when a handshake
	// fails (so that the caller can see why).
	maxDrain = 64 << 10
)

// peerIDAuth is one libp2p PeerID-authentication session (libp2p HTTP
// peer-id-auth, as implemented by go-libp2p's
// [httppeeridauth.ClientPeerIDAuth]) of one host with the HTTP servers it
// talks to.
//
// The session keeps the bearer token of each server (by request Host) and
// reuses it, so only the first request to a server costs a handshake. Its HTTP
// client has a cookie jar, so a load balancer's affinity cookie set on the
// first leg of a handshake pins the second leg to the same backend (go-libp2p
// servers reject each other's handshake state). The identity key never leaves
// the process: only signatures and the public key are sent.
//
// A peerIDAuth is safe for concurrent use.
type peerIDAuth struct {
	key    crypto.PrivKey
	client *http.Client

	mu   sync.Mutex
	auth *httppeeridauth.ClientPeerIDAuth
}

// newPeerIDAuth returns a session that authenticates as the owner of key,
// the host's libp2p identity key.
//
// base is the HTTP client to send requests with; nil means a client with a
// [defaultHTTPTimeout] overall timeout per request. The session uses a copy
// of it, so the caller's client is never modified: the copy has a fresh
// cookie jar if base has none, and never follows a redirect, whatever base's
// CheckRedirect says (see [noRedirects]).
func newPeerIDAuth(key crypto.PrivKey, base *http.Client) *peerIDAuth {
	var c http.Client
	if base != nil {
		c = *base // a shallow copy: Transport, Jar and Timeout are shared
	} else {
		c.Timeout = defaultHTTPTimeout
	}
	c.CheckRedirect = noRedirects
	if c.Jar == nil {
		// cookiejar.New only fails on a bad Options value; nil is valid.
		jar, err := cookiejar.New(nil)
		if err == nil {
			c.Jar = jar
		}
	}
	return &peerIDAuth{key: key, client: &c, auth: newClientAuth(key)}
}

// noRedirects is the CheckRedirect of a session's client: the 3xx response
// itself is returned, and nothing is sent to the place it names. Following it
// would send the request's headers there (the PeerID handshake, the bearer
// token, any access token the caller set: Go drops only Authorization and
// Cookie, and only across hosts), over plain HTTP if the Location says so.
func noRedirects(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// newClientAuth returns a go-libp2p client with an empty token cache.
func newClientAuth(key crypto.PrivKey) *httppeeridauth.ClientPeerIDAuth {
	return &httppeeridauth.ClientPeerIDAuth{PrivKey: key, TokenTTL: peerIDAuthTokenTTL}
}

// httpClient returns the session's HTTP client (with its cookie jar), for
// requests that need no authentication but should reach the same backend.
func (a *peerIDAuth) httpClient() *http.Client { return a.client }

// current returns the go-libp2p client in use.
func (a *peerIDAuth) current() *httppeeridauth.ClientPeerIDAuth {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.auth
}

// reset forgets every token of the session if old is still the client in use.
func (a *peerIDAuth) reset(old *httppeeridauth.ClientPeerIDAuth) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.auth == old {
		a.auth = newClientAuth(a.key)
	}
}

// errHandshakeRefused is wrapped by the error do returns when the server
// answered the handshake with a response that does not carry it on (for
// example a 400 from its authentication layer, or a 429 or 503 from a proxy in
// front of it).
var errHandshakeRefused = errors.New("server did not complete the PeerID authentication handshake")

// do sends req to its server authenticated as the host and returns the
// server's PeerID (proved by the server's signature; not compared with any
// expected PeerID) and the server's response to req.
//
// The first request to a server runs the 2-request client-initiated handshake,
// sending req's body only on the second request, once the server has proved
// its identity; the bearer token it yields is kept and later requests cost one
// HTTP request. If the server rejects a kept token, the handshake is run again
// and req is re-sent, so req's body must be replayable: do buffers it (at most
// [maxReplayBody] bytes) when req.GetBody is nil. req itself is not modified,
// but its Body is consumed.
//
// If the handshake fails on a network error, do returns it with a nil
// response. If it fails because of what the server answered, do returns the
// last response together with an error wrapping [errHandshakeRefused], so
// that the caller can act on its status and headers; its body is a bounded
// in-memory copy. A non-nil response must be closed. A redirect is never
// followed: a 3xx is returned as the server's answer (with a refusal error if
// it came before the handshake completed).
func (a *peerIDAuth) do(req *http.Request) (peer.ID, *http.Response, error) {
	if req == nil {
		return "", nil, errors.New("peer ID auth: nil request")
	}
	if a.key == nil {
		return "", nil, errors.New("peer ID auth: no identity key")
	}
	r := req.Clone(req.Context()) // go-libp2p sets headers on the request it is given
	if err := makeReplayable(r); err != nil {
		return "", nil, fmt.Errorf("peer ID auth: %w", err)
	}

	auth := a.current()
	rt := &recordingTransport{client: a.client}
	id, resp, err := auth.AuthenticateWithRoundTripper(rt, r)
	if err != nil {
		if resp != nil { // go-libp2p returns one only if GetBody is nil, which we prevent
			resp.Body.Close()
		}
		last := rt.lastResp
		if rt.lastErr != nil || last == nil {
			return "", nil, fmt.Errorf("peer ID auth: %w", err)
		}
		// The server answered, but not with the handshake's next step.
		// go-libp2p has closed that response; hand back what it carried,
		// and drop any token the server may no longer accept.
		a.reset(auth)
		refused := *last
		refused.Body = io.NopCloser(bytes.NewReader(rt.lastBody.kept))
		refused.ContentLength = int64(len(rt.lastBody.kept))
		return "", &refused, fmt.Errorf("peer ID auth: %w: %w", errHandshakeRefused, err)
	}
	if resp.StatusCode == http.StatusUnauthorized || !rt.lastBearer && resp.Header.Get("Authentication-Info") == "" {
		// The server did not accept the handshake we ended with (e.g. a
		// backend that does not know the HMAC key of the one that started
		// it), or something in front of it answered the handshake's last
		// request (a proxy's 503 or 429, a redirect) without the bearer
		// token. go-libp2p then caches an empty bearer token that would
		// turn every later request into a 400: start over with no token.
		a.reset(auth)
	}
	return id, resp, nil
}

// makeReplayable makes sure r.GetBody is set, buffering r.Body if needed.
func makeReplayable(r *http.Request) error {
	if r.GetBody != nil {
		return nil
	}
	if r.Body == nil || r.Body == http.NoBody {
		r.Body = http.NoBody
		r.ContentLength = 0
		r.GetBody = func() (io.ReadCloser, error) { return http.NoBody, nil }
		return nil
	}
	b, err := io.ReadAll(io.LimitReader(r.Body, maxReplayBody+1))
	r.Body.Close()
	if err != nil {
		return fmt.Errorf("reading request body: %w", err)
	}
	if len(b) > maxReplayBody {
		return fmt.Errorf("request body larger than %d bytes", maxReplayBody)
	}
	r.ContentLength = int64(len(b))
	r.Body = io.NopCloser(bytes.NewReader(b))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
	return nil
}

// recordingTransport sends the requests of one do call through the session's
// HTTP client (so that its jar, timeout and refusal of redirects apply) and
// remembers the outcome of the last one. go-libp2p calls it sequentially.
type recordingTransport struct {
	client *http.Client
	// lastBearer: the last request carried a bearer token (go-libp2p
	// writes it as the scheme's first parameter); otherwise it was a
	// handshake leg, whose response must carry the token.
	lastBearer bool
	lastResp   *http.Response
	lastBody   *drainingBody
	lastErr    error
}

// RoundTrip implements [http.RoundTripper].
func (t *recordingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	t.lastBearer = strings.Contains(req.Header.Get("Authorization"), " bearer=")
	resp, err := t.client.Do(req)
	t.lastResp, t.lastBody, t.lastErr = nil, nil, err
	if err != nil {
		return nil, err
	}
	body := &drainingBody{rc: resp.Body}
	resp.Body = body
	t.lastResp, t.lastBody = resp, body
	return resp, nil
}

// drainingBody is a response body that, when closed, first reads what is
// left of it (at most [maxDrain] bytes) so that the connection can carry the
// next handshake leg, and keeps those bytes.
type drainingBody struct {
	rc     io.ReadCloser
	kept   []byte
	closed bool
}

// Read implements [io.Reader].
func (b *drainingBody) Read(p []byte) (int, error) { return b.rc.Read(p) }

// Close implements [io.Closer].
func (b *drainingBody) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	b.kept, _ = io.ReadAll(io.LimitReader(b.rc, maxDrain))
	return b.rc.Close()
}
