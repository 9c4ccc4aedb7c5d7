package testforge

import (
	"bytes"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	httppeeridauth "github.com/libp2p/go-libp2p/p2p/http/auth"
)

const (
	healthPath    = "/v1/health"
	challengePath = "/v1/_acme-challenge"

	// ForgeAuthHeader carries the access token when [Config.AccessToken]
	// is set.
	ForgeAuthHeader = "Forge-Authorization"

	maxBodySize = 64 << 10
	// identifyTimeout bounds the best-effort identify after a successful
	// dial-back, as the public broker's libp2p default does.
	identifyTimeout = 5 * time.Second
)

// broker is the registration endpoint: health, and PeerID-authenticated
// challenge registration with a libp2p dial-back (protocol §2.2–2.6).
type broker struct {
	f    *Forge
	srv  *httptest.Server
	url  string
	auth *httppeeridauth.ServerPeerIDAuth
	// relisten is the listener of the last BrokerUp, if any; guarded by
	// brokerSwitch.
	relisten net.Listener
}

// registration is the request body; unknown fields are rejected.
type registration struct {
	Value     string   `json:"value"`
	Addresses []string `json:"addresses"`
}

func startBroker(f *Forge) (*broker, error) {
	// The broker's identity is throwaway, as on the public broker.
	key, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating broker key: %w", err)
	}
	b := &broker{f: f}
	b.srv, err = newServer(f.cfg.listenIP(), http.HandlerFunc(b.serveHTTP), f.log.With("component", "broker"))
	if err != nil {
		return nil, err
	}
	host := b.srv.Listener.Addr().String()
	b.auth = &httppeeridauth.ServerPeerIDAuth{
		PrivKey:  key,
		TokenTTL: time.Hour,
		// Plain HTTP on loopback stands in for the public broker behind
		// its TLS terminator; the hostname signed by clients must be our
		// exact host:port, which is how tests check hostname binding.
		NoTLS:           true,
		ValidHostnameFn: func(h string) bool { return h == host },
	}
	b.srv.Start()
	b.url = b.srv.URL
	return b, nil
}

// close stops the server and waits for in-flight requests; their dial-backs
// are aborted when the forge's context is canceled.
func (b *broker) close() {
	brokerSwitch.Lock()
	if b.relisten != nil {
		_ = b.relisten.Close()
	}
	brokerSwitch.Unlock()
	b.srv.Close()
}

func (b *broker) serveHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case healthPath:
		b.f.stats.health.Add(1)
	case challengePath:
		b.f.stats.challenge.Add(1)
	}
	if fn := b.f.brokerFault.Load(); fn != nil && (*fn)(w, r) {
		return
	}
	switch r.URL.Path {
	case healthPath:
		w.WriteHeader(http.StatusNoContent)
	case challengePath:
		b.auth.ServeHTTPWithNextHandler(w, r, b.register)
	default:
		http.NotFound(w, r)
	}
}

// register handles an authenticated request to /v1/_acme-challenge, with the
// status codes and bodies of the public broker (protocol §2.4).
func (b *broker) register(id peer.ID, w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "400 Bad Request: Only POST method is allowed.", http.StatusBadRequest)
		return
	}
	if token := b.f.cfg.AccessToken; token != "" &&
		subtle.ConstantTimeCompare([]byte(r.Header.Get(ForgeAuthHeader)), []byte(token)) != 1 {
		reply(w, http.StatusForbidden, "403 Forbidden: Missing "+ForgeAuthHeader+" header.")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodySize))
	if err != nil {
		reply(w, http.StatusInternalServerError, fmt.Sprintf("error reading body: %s", err))
		return
	}
	var reg registration
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&reg); err != nil {
		reply(w, http.StatusBadRequest, fmt.Sprintf("error decoding body: %s", err))
		return
	}
	digest, err := base64.RawURLEncoding.DecodeString(reg.Value)
	if err != nil {
		reply(w, http.StatusBadRequest, fmt.Sprintf("error decoding value as base64url: %s", err))
		return
	}
	if len(digest) != 32 {
		reply(w, http.StatusBadRequest, "value is not a base64url of a SHA256 digest")
		return
	}
	if err := b.f.dialBack(r.Context(), id, reg.Addresses); err != nil {
		b.f.log.Debug("broker: dial-back failed", "peer", id, "err", err)
		reply(w, http.StatusBadRequest, fmt.Sprintf("error testing addresses: %s", err))
		return
	}
	b.f.store.set(id, reg.Value)
	b.f.stats.registered.Add(1)
	b.f.log.Debug("broker: registered challenge", "peer", id, "name", acmePrefix+"."+PeerLabel(id)+"."+b.f.Domain)
	w.WriteHeader(http.StatusOK)
}

func reply(w http.ResponseWriter, status int, body string) {
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}
