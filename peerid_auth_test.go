package autotls

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	httppeeridauth "github.com/libp2p/go-libp2p/p2p/http/auth"
)

// authTestServer is a loopback HTTP server whose handler is go-libp2p's own
// ServerPeerIDAuth (swappable, to simulate a restart), recording every
// request it receives and every request that reaches the application.
type authTestServer struct {
	t      *testing.T
	srv    *httptest.Server
	host   string // Host of the requests: 127.0.0.1:<port>
	key    crypto.PrivKey
	auth   atomic.Pointer[httppeeridauth.ServerPeerIDAuth]
	before atomic.Pointer[func(w http.ResponseWriter, r *http.Request) bool] // runs before the auth layer, if set; true: it answered
	app    atomic.Pointer[func(w http.ResponseWriter, r *http.Request)]      // answers authenticated requests, if set
	hostOK atomic.Pointer[func(host string) bool]                            // overrides the Host check, if set
	conns  connTracker                                                       // the server's connections

	mu      sync.Mutex
	dumps   [][]byte      // every request as received (headers and body)
	authz   []string      // the Authorization header of every request
	handled []handledCall // requests that reached the application
}

// handledCall is a request that passed authentication.
type handledCall struct {
	peer peer.ID
	body string
	hdr  http.Header
}

// newAuthTestServer starts a server on 127.0.0.1 whose auth layer accepts
// only its own Host and answers authenticated requests with 200 "ok" (or
// what app, once set, writes).
func newAuthTestServer(t *testing.T) *authTestServer { return startAuthTestServer(t, false) }

// newAuthTestServerTLS is [newAuthTestServer] over HTTPS; s.srv.Client()
// trusts its certificate.
func newAuthTestServerTLS(t *testing.T) *authTestServer { return startAuthTestServer(t, true) }

func startAuthTestServer(t *testing.T, useTLS bool) *authTestServer {
	t.Helper()
	s := &authTestServer{t: t, key: genTestKey(t)}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.host = l.Addr().String()
	s.srv = &httptest.Server{Listener: l, Config: &http.Server{Handler: http.HandlerFunc(s.serve), ConnState: s.conns.hook}}
	if useTLS {
		s.srv.StartTLS()
	} else {
		s.srv.Start()
	}
	t.Cleanup(s.srv.Close)
	s.restart(nil, time.Hour)
	return s
}

// restart replaces the auth layer by a new one with the given HMAC key
// (nil: random) and token lifetime, as a restarted server would have.
func (s *authTestServer) restart(hmacKey []byte, tokenTTL time.Duration) {
	s.auth.Store(&httppeeridauth.ServerPeerIDAuth{
		PrivKey:         s.key,
		TokenTTL:        tokenTTL,
		NoTLS:           true,
		ValidHostnameFn: s.validHost,
		HmacKey:         hmacKey,
		Next:            s.next,
	})
}

// validHost is the auth layer's Host check: the server's own address
// unless overridden.
func (s *authTestServer) validHost(h string) bool {
	if f := s.hostOK.Load(); f != nil {
		return (*f)(h)
	}
	return h == s.host
}

func (s *authTestServer) serve(w http.ResponseWriter, r *http.Request) {
	dump, err := httputil.DumpRequest(r, true) // restores r.Body
	if err != nil {
		s.t.Errorf("dumping request: %v", err)
	}
	s.mu.Lock()
	s.dumps = append(s.dumps, dump)
	s.authz = append(s.authz, r.Header.Get("Authorization"))
	s.mu.Unlock()
	if before := s.before.Load(); before != nil && (*before)(w, r) {
		return
	}
	s.auth.Load().ServeHTTP(w, r)
}

func (s *authTestServer) next(p peer.ID, w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		s.t.Errorf("reading body: %v", err)
	}
	s.mu.Lock()
	s.handled = append(s.handled, handledCall{peer: p, body: string(body), hdr: r.Header.Clone()})
	s.mu.Unlock()
	if app := s.app.Load(); app != nil {
		r.Body = io.NopCloser(bytes.NewReader(body))
		(*app)(w, r)
		return
	}
	io.WriteString(w, "ok")
}

// setApp sets what authenticated requests are answered with.
func (s *authTestServer) setApp(h func(w http.ResponseWriter, r *http.Request)) { s.app.Store(&h) }

// setBefore sets what runs before the auth layer sees a request; if it
// returns true, it has answered the request itself.
func (s *authTestServer) setBefore(h func(w http.ResponseWriter, r *http.Request) bool) {
	s.before.Store(&h)
}

// setHostCheck replaces the auth layer's Host check.
func (s *authTestServer) setHostCheck(f func(host string) bool) { s.hostOK.Store(&f) }

// record returns copies of the requests received and of the Authorization
// headers they carried, and how many reached the application.
func (s *authTestServer) record() (dumps [][]byte, authz []string, handled int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.dumps), slices.Clone(s.authz), len(s.handled)
}

// requests returns how many requests the server has received.
func (s *authTestServer) requests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.dumps)
}

// lastHandled returns the last request that reached the application.
func (s *authTestServer) lastHandled() handledCall {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.handled) == 0 {
		s.t.Fatal("no request reached the application")
	}
	return s.handled[len(s.handled)-1]
}

// url returns the server's URL for path.
func (s *authTestServer) url(path string) string { return s.srv.URL + path }

// genTestKey returns a fresh Ed25519 libp2p key.
func genTestKey(t testing.TB) crypto.PrivKey {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// postThroughAuth sends body to the test server through a with a body that
// has no GetBody, and checks the response is 200 "ok".
func postThroughAuth(t *testing.T, a *peerIDAuth, s *authTestServer, body string) peer.ID {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, s.url("/v1/_acme-challenge"),
		io.NopCloser(strings.NewReader(body))) // not replayable on its own
	if err != nil {
		t.Fatal(err)
	}
	id, resp, err := a.do(req)
	if err != nil {
		t.Fatalf("do: %v", err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(got) != "ok" {
		t.Fatalf("response %d %q, want 200 \"ok\"", resp.StatusCode, got)
	}
	if req.Header.Get("Authorization") != "" {
		t.Error("do modified the caller's request")
	}
	return id
}

func TestPeerIDAuthTokenReuse(t *testing.T) {
	s := newAuthTestServer(t)
	key := genTestKey(t)
	a := newPeerIDAuth(key, nil)
	clientID, _ := peer.IDFromPrivateKey(key)
	serverID, _ := peer.IDFromPrivateKey(s.key)

	const body = `{"value":"first"}`
	id := postThroughAuth(t, a, s, body)
	if id != serverID {
		t.Errorf("server PeerID %s, want %s", id, serverID)
	}
	if n := s.requests(); n != 2 {
		t.Errorf("first call: %d requests at the server, want 2 (client-initiated handshake)", n)
	}
	if h := s.lastHandled(); h.peer != clientID || h.body != body {
		t.Errorf("server saw peer %s body %q, want %s %q", h.peer, h.body, clientID, body)
	}

	const body2 = `{"value":"second"}`
	if id := postThroughAuth(t, a, s, body2); id != serverID {
		t.Errorf("second call: server PeerID %s, want %s", id, serverID)
	}
	if n := s.requests(); n != 3 {
		t.Errorf("after second call: %d requests at the server, want 3 (bearer token reused)", n)
	}
	if h := s.lastHandled(); h.peer != clientID || h.body != body2 {
		t.Errorf("server saw peer %s body %q, want %s %q", h.peer, h.body, clientID, body2)
	}
	if _, authz, _ := s.record(); !strings.Contains(authz[2], `bearer="`) {
		t.Errorf("second call's Authorization %q carries no bearer token", authz[2])
	}
}

func TestPeerIDAuthReauthentication(t *testing.T) {
	tests := []struct {
		name       string
		invalidate func(s *authTestServer)
	}{
		{"server restarted with a new HMAC key", func(s *authTestServer) {
			s.restart([]byte("another key, another server instance"), time.Hour)
		}},
		{"token expired", func(s *authTestServer) {
			// Long enough for the new token to be used right after it is
			// issued, short enough to wait out the first one.
			s.restart([]byte("fixed key"), time.Second)
			time.Sleep(1200 * time.Millisecond)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newAuthTestServer(t)
			s.restart([]byte("fixed key"), time.Hour)
			a := newPeerIDAuth(genTestKey(t), nil)
			postThroughAuth(t, a, s, "first")

			tt.invalidate(s)
			const body = `{"value":"after re-authentication","addresses":["/ip4/127.0.0.1/tcp/1"]}`
			postThroughAuth(t, a, s, body)
			// Rejected bearer request, then go-libp2p's server-initiated
			// handshake (2 requests, the first with no body).
			if n := s.requests(); n != 2+3 {
				t.Errorf("%d requests at the server, want 5 (2, then 1 rejected + 2)", n)
			}
			if h := s.lastHandled(); h.body != body {
				t.Errorf("application saw body %q, want %q", h.body, body)
			}
			// The new token is used from now on.
			postThroughAuth(t, a, s, "third")
			if n := s.requests(); n != 6 {
				t.Errorf("%d requests at the server after the third call, want 6", n)
			}
		})
	}
}

func TestPeerIDAuthHostnameBinding(t *testing.T) {
	t.Run("server expects another hostname", func(t *testing.T) {
		s := newAuthTestServer(t)
		s.setHostCheck(func(h string) bool { return h == "registration.example" })
		a := newPeerIDAuth(genTestKey(t), nil)
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.url("/"), strings.NewReader("secret body"))
		_, resp, err := a.do(req)
		if !errors.Is(err, errHandshakeRefused) {
			t.Fatalf("err = %v, want errHandshakeRefused", err)
		}
		if resp == nil || resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("response %v, want the server's 400", resp)
		}
		resp.Body.Close()
		dumps, _, handled := s.record()
		if handled != 0 {
			t.Error("the request reached the application")
		}
		for _, d := range dumps {
			if bytes.Contains(d, []byte("secret body")) {
				t.Error("body sent before the server was authenticated")
			}
		}
	})

	t.Run("server signs for another hostname", func(t *testing.T) {
		// A proxy that rewrites Host: the server signs for the name it
		// sees, which is not the one the client asked for.
		s := newAuthTestServer(t)
		s.setHostCheck(func(string) bool { return true })
		s.setBefore(func(_ http.ResponseWriter, r *http.Request) bool { r.Host = "elsewhere.example"; return false })
		a := newPeerIDAuth(genTestKey(t), nil)
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.url("/"), strings.NewReader("secret body"))
		_, resp, err := a.do(req)
		if err == nil || !strings.Contains(err.Error(), "signature verification failed") {
			t.Fatalf("err = %v, want a signature verification failure", err)
		}
		if resp != nil {
			resp.Body.Close()
		}
		if dumps, _, handled := s.record(); len(dumps) != 1 || handled != 0 {
			t.Errorf("%d requests, %d handled; want 1 and 0", len(dumps), handled)
		}
	})

	t.Run("client signs for another hostname", func(t *testing.T) {
		s := newAuthTestServer(t)
		client := genTestKey(t)
		leg1 := manualLeg1(t, s, client)
		for _, tc := range []struct {
			hostname string
			want     int
		}{{"elsewhere.example", http.StatusBadRequest}, {s.host, http.StatusOK}} {
			status, _ := manualLeg2(t, s, client, leg1, tc.hostname)
			if status != tc.want {
				t.Errorf("client signed for %q: status %d, want %d", tc.hostname, status, tc.want)
			}
		}
	})
}

func TestPeerIDAuthKeyNeverSent(t *testing.T) {
	s := newAuthTestServer(t)
	key := genTestKey(t)
	a := newPeerIDAuth(key, nil)
	postThroughAuth(t, a, s, "one")
	s.restart(nil, time.Hour) // force the server-initiated flow too
	postThroughAuth(t, a, s, "two")
	postThroughAuth(t, a, s, "three")

	raw, err := key.Raw() // Ed25519: seed || public key
	if err != nil {
		t.Fatal(err)
	}
	marshalled, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dumps, _, _ := s.record()
	all := bytes.Join(dumps, []byte("\n"))
	if len(dumps) != 6 {
		t.Fatalf("%d requests captured, want 6", len(dumps))
	}
	for name, secret := range map[string][]byte{"seed": raw[:32], "raw key": raw, "protobuf key": marshalled} {
		for _, form := range encodedForms(secret) {
			if bytes.Contains(all, []byte(form)) {
				t.Errorf("the %s was sent (as %q)", name, form)
			}
		}
	}
	// The scan is not vacuous: the public key is sent, in the same encoding.
	pub, _ := crypto.MarshalPublicKey(key.GetPublic())
	if !bytes.Contains(all, []byte(base64.URLEncoding.EncodeToString(pub))) {
		t.Error("the public key was not found in the captured requests: the capture is broken")
	}
}

// encodedForms returns secret raw, in hex, and in every base64 variant at
// every alignment (only the characters that depend on secret alone).
func encodedForms(secret []byte) []string {
	forms := []string{string(secret), hex.EncodeToString(secret), strings.ToUpper(hex.EncodeToString(secret))}
	encs := []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding, base64.RawURLEncoding}
	for _, enc := range encs {
		for shift := range 3 {
			buf := append(make([]byte, shift), secret...)
			s := enc.EncodeToString(buf)
			start := (shift*8 + 5) / 6 // first character free of the prefix's bits
			end := len(buf) * 8 / 6    // past the last character made of whole secret bits
			forms = append(forms, s[start:end])
		}
	}
	return forms
}

func TestPeerIDAuthCookieJar(t *testing.T) {
	s := newAuthTestServer(t)
	var (
		mu      sync.Mutex
		cookies []string
	)
	s.setBefore(func(w http.ResponseWriter, r *http.Request) bool {
		mu.Lock()
		cookies = append(cookies, r.Header.Get("Cookie"))
		mu.Unlock()
		if _, err := r.Cookie("backend"); err != nil {
			http.SetCookie(w, &http.Cookie{Name: "backend", Value: "b1"})
		}
		return false
	})
	base := &http.Client{Timeout: 10 * time.Second}
	a := newPeerIDAuth(genTestKey(t), base)
	postThroughAuth(t, a, s, "body")
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"", "backend=b1"}; !slices.Equal(cookies, want) {
		t.Errorf("cookies seen per request %q, want %q", cookies, want)
	}
	if base.Jar != nil {
		t.Error("newPeerIDAuth modified the caller's client")
	}
	if a.httpClient().Timeout != base.Timeout {
		t.Error("the session's client lost the caller's settings")
	}
}

// discardingJar is a cookie jar that keeps nothing.
type discardingJar struct{}

func (discardingJar) SetCookies(*url.URL, []*http.Cookie) {}
func (discardingJar) Cookies(*url.URL) []*http.Cookie     { return nil }

func TestPeerIDAuthLoadBalancer(t *testing.T) {
	// Two backends that do not share an HMAC key, behind a balancer that
	// alternates unless an affinity cookie names a backend.
	for _, tc := range []struct {
		name   string
		jar    http.CookieJar
		wantOK bool
	}{
		{"session cookie jar keeps affinity", nil, true},
		{"no cookies", discardingJar{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newAuthTestServer(t)
			backends := [2]*httppeeridauth.ServerPeerIDAuth{}
			for i := range backends {
				s.restart([]byte{byte(i), 'k', 'e', 'y'}, time.Hour)
				backends[i] = s.auth.Load()
			}
			var n atomic.Int64
			s.setBefore(func(w http.ResponseWriter, r *http.Request) bool {
				i := int(n.Add(1)) % 2
				if c, err := r.Cookie("backend"); err == nil && (c.Value == "0" || c.Value == "1") {
					i = int(c.Value[0] - '0')
				} else {
					http.SetCookie(w, &http.Cookie{Name: "backend", Value: string(rune('0' + i))})
				}
				s.auth.Store(backends[i]) // requests are sequential
				return false
			})
			a := newPeerIDAuth(genTestKey(t), &http.Client{Jar: tc.jar})
			for call := range 2 {
				req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.url("/"), strings.NewReader("body"))
				_, resp, err := a.do(req)
				if err != nil {
					t.Fatalf("call %d: %v", call, err)
				}
				resp.Body.Close()
				if ok := resp.StatusCode == http.StatusOK; ok != tc.wantOK {
					t.Errorf("call %d: status %d, want success %v", call, resp.StatusCode, tc.wantOK)
				}
			}
			// A failed second leg must not leave an empty bearer token
			// behind (go-libp2p caches one; the server answers it with 400).
			_, authz, _ := s.record()
			for i, h := range authz {
				if !strings.Contains(h, `="`) {
					t.Errorf("request %d sent Authorization %q", i, h)
				}
			}
		})
	}
}

func TestPeerIDAuthNetworkError(t *testing.T) {
	s := newAuthTestServer(t)
	s.srv.Close()
	a := newPeerIDAuth(genTestKey(t), nil)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, s.url("/"), nil)
	_, resp, err := a.do(req)
	if err == nil || resp != nil {
		t.Fatalf("do = %v, %v; want a network error and no response", resp, err)
	}
	if errors.Is(err, errHandshakeRefused) {
		t.Errorf("network error %v reported as a refusal", err)
	}
	var opErr *net.OpError
	if !errors.As(err, &opErr) {
		t.Errorf("err %v does not wrap the network error", err)
	}
}

func TestPeerIDAuthBodyTooLarge(t *testing.T) {
	s := newAuthTestServer(t)
	a := newPeerIDAuth(genTestKey(t), nil)
	big := io.NopCloser(bytes.NewReader(make([]byte, maxReplayBody+1)))
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.url("/"), big)
	if _, _, err := a.do(req); err == nil {
		t.Fatal("do buffered a body larger than its limit")
	}
	if s.requests() != 0 {
		t.Error("a request was sent")
	}
}

// Spec test vectors (protocol.md §1.3): keys from fixed seeds, hostname
// example.com.
const (
	vecServerPrivHex = "0801124001010101010101010101010101010101010101010101010101010101010101018a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
	vecClientPubHex  = "080112208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"
	vecHostname      = "example.com"
)

func TestPeerIDAuthRedirectNotFollowed(t *testing.T) {
	// Redirected before the handshake (a proxy) or after it (the
	// application, which sees the bearer token): either way the 3xx is the
	// answer and its target sees nothing, whatever the caller's client says.
	for _, tc := range []struct {
		name   string
		before bool
		base   *http.Client
	}{
		{"before the handshake", true, nil},
		{"after the handshake", false, nil},
		{"before the handshake, caller's client follows", true, &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return nil }}},
		{"after the handshake, caller's client follows", false, &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return nil }}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hits atomic.Int64
			target := newLoopbackServer(t, http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
			s := newAuthTestServer(t)
			redirect := func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, target.URL+r.URL.Path, http.StatusTemporaryRedirect)
			}
			if tc.before {
				s.setBefore(func(w http.ResponseWriter, r *http.Request) bool { redirect(w, r); return true })
			} else {
				s.setApp(redirect)
			}
			a := newPeerIDAuth(genTestKey(t), tc.base)
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.url("/v1/_acme-challenge"), strings.NewReader("body"))
			_, resp, err := a.do(req)
			if resp == nil {
				t.Fatalf("no response (err %v), want the 307", err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusTemporaryRedirect || resp.Header.Get("Location") != target.URL+"/v1/_acme-challenge" {
				t.Errorf("response %d Location %q, want the 307 to the target", resp.StatusCode, resp.Header.Get("Location"))
			}
			if tc.before != errors.Is(err, errHandshakeRefused) {
				t.Errorf("err = %v; want a refusal only when redirected before the handshake", err)
			}
			if n := hits.Load(); n != 0 {
				t.Errorf("the redirect target received %d requests", n)
			}
			if tc.base != nil && tc.base.CheckRedirect == nil {
				t.Error("the caller's client was modified")
			}
		})
	}
}
