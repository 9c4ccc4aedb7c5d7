package testforge

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
)

// pebbleEnvMu serializes Pebble's construction: va.New and wfe.New read
// their settings from process environment variables (only then, never per
// request), so each forge sets them, constructs, and restores them while
// holding this lock. Forges with different settings can therefore be started
// from parallel tests, as long as nothing else sets PEBBLE_* variables
// meanwhile.
var pebbleEnvMu sync.Mutex

// pebble is Pebble's ACME server running in-process.
type pebble struct {
	srv           *httptest.Server
	va            *va.VAImpl
	directoryURL  string
	caRoots       *x509.CertPool
	caRootPEM     []byte
	issuerRoots   *x509.CertPool
	issuerRootPEM []byte
	log           *slog.Logger
	store         *db.MemoryStore
}

func startPebble(cfg Config, dnsAddr string, logger *slog.Logger, count *atomic.Int64) (*pebble, error) {
	plog := slog.NewLogLogger(logger.Handler(), slog.LevelDebug)
	if cfg.Logger == nil {
		plog = log.New(io.Discard, "", 0) // log skips formatting for io.Discard
	}

	profiles, err := pebbleProfiles(cfg)
	if err != nil {
		return nil, err
	}

	store := db.NewMemoryStore()
	authority := ca.New(plog, store, "", "ecdsa", 0, 1, profiles)

	v, frontEnd := newVAAndWFE(cfg, plog, store, authority, dnsAddr)

	tlsCert, leaf, err := selfSignedLoopbackCert(cfg.listenIP().AsSlice())
	if err != nil {
		stopVA(v, logger)
		return nil, fmt.Errorf("making the ACME endpoint's TLS certificate: %w", err)
	}
	acmeHandler := frontEnd.Handler()
	// Pebble's store deadlocks under concurrent load: a new order looks for
	// a reusable authorization holding the store's read lock and taking each
	// authorization's (db.MemoryStore.FindValidAuthorization), while a
	// request on an authorization holds that authorization's write lock and
	// takes the store's read lock (wfe.Authz); with a store writer waiting
	// in between (AddChallenge of another new order), nothing moves again.
	// Seen with 50 hosts issuing at once. New orders therefore never run
	// alongside requests on authorizations.
	var orderMu sync.RWMutex
	srv, err := newServer(cfg.listenIP(), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		count.Add(1)
		switch {
		case r.URL.Path == "/order-plz":
			orderMu.Lock()
			defer orderMu.Unlock()
		case strings.HasPrefix(r.URL.Path, "/authZ/"):
			orderMu.RLock()
			defer orderMu.RUnlock()
		}
		acmeHandler.ServeHTTP(w, r)
	}), logger)
	if err != nil {
		stopVA(v, logger)
		return nil, err
	}
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{tlsCert}}
	srv.StartTLS()

	caRoots := x509.NewCertPool()
	caRoots.AddCert(leaf)

	root := authority.GetRootCert(0)
	if root == nil || root.Cert == nil {
		srv.Close()
		stopVA(v, logger)
		return nil, fmt.Errorf("pebble has no issuing root")
	}
	issuerRoots := x509.NewCertPool()
	issuerRoots.AddCert(root.Cert)

	return &pebble{
		srv:           srv,
		va:            v,
		directoryURL:  srv.URL + wfe.DirectoryPath,
		caRoots:       caRoots,
		caRootPEM:     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw}),
		issuerRoots:   issuerRoots,
		issuerRootPEM: root.PEM(),
		log:           logger,
		store:         store,
	}, nil
}

// pebbleProfiles returns the profiles Pebble offers, from cfg.Profiles
// and cfg.CertValidity.
func pebbleProfiles(cfg Config) (map[string]ca.Profile, error) {
	seconds := func(d time.Duration) uint64 {
		if d <= 0 {
			d = cfg.CertValidity
		}
		if d <= 0 {
			return 0 // Pebble's default
		}
		return uint64((d + time.Second - 1) / time.Second)
	}
	if cfg.Profiles == nil {
		// Pebble picks a random profile for orders that name none: both
		// have the same validity so the choice does not matter.
		return map[string]ca.Profile{
			"default":    {Description: "test forge default profile", ValidityPeriod: seconds(0)},
			"shortlived": {Description: "test forge short-lived profile", ValidityPeriod: seconds(0)},
		}, nil
	}
	if len(cfg.Profiles) == 0 {
		// Pebble panics on an order without a profile when it has none.
		return nil, fmt.Errorf("testforge: Config.Profiles is empty; give at least one profile, or nil for the defaults")
	}
	profiles := make(map[string]ca.Profile, len(cfg.Profiles))
	for name, d := range cfg.Profiles {
		if name == "" || d < 0 {
			return nil, fmt.Errorf("testforge: Config.Profiles: want a name and a validity of zero or more, got %q: %v", name, d)
		}
		profiles[name] = ca.Profile{Description: "test forge profile " + name, ValidityPeriod: seconds(d)}
	}
	return profiles, nil
}

// newVAAndWFE constructs the VA and the WFE with the environment variables
// they read set from cfg, restoring the environment afterwards.
func newVAAndWFE(cfg Config, plog *log.Logger, store *db.MemoryStore, authority *ca.CAImpl, dnsAddr string) (*va.VAImpl, wfe.WebFrontEndImpl) {
	pebbleEnvMu.Lock()
	defer pebbleEnvMu.Unlock()
	restore := setEnv(map[string]string{
		"PEBBLE_VA_NOSLEEP":      "1",
		"PEBBLE_VA_ALWAYS_VALID": "0",
		"PEBBLE_WFE_NONCEREJECT": strconv.Itoa(max(cfg.NonceRejectPercent, 0)),
		"PEBBLE_AUTHZREUSE":      strconv.Itoa(min(max(cfg.AuthzReusePercent, 0), 100)),
	})
	defer restore()

	// The VA queries our DNS server over TCP; it never uses the system
	// resolver. HTTP-01 and TLS-ALPN-01 ports are irrelevant (DNS-01 only).
	v := va.New(plog, 0, 0, false, dnsAddr, store)
	frontEnd := wfe.New(plog, store, v, authority, nil, false, false,
		max(cfg.RetryAfterAuthz, 0), max(cfg.RetryAfterOrder, 0))
	return v, frontEnd
}

// newLoopbackServer returns an unstarted test server listening on
// 127.0.0.1, logging its errors (e.g. TLS handshake failures) at debug.
// Unlike httptest.NewUnstartedServer it returns an error rather than panic
// when it cannot listen.
func newLoopbackServer(h http.Handler, logger *slog.Logger) (*httptest.Server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listening on loopback: %w", err)
	}
	return &httptest.Server{
		Listener: ln,
		Config: &http.Server{
			Handler:           h,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
			ReadHeaderTimeout: time.Minute,
		},
	}, nil
}

// setEnv sets the given variables and returns a function that restores
// their previous values.
func setEnv(vars map[string]string) (restore func()) {
	type prev struct {
		value string
		set   bool
	}
	old := make(map[string]prev, len(vars))
	for k, v := range vars {
		value, set := os.LookupEnv(k)
		old[k] = prev{value, set}
		_ = os.Setenv(k, v)
	}
	return func() {
		for k, p := range old {
			if p.set {
				_ = os.Setenv(k, p.value)
			} else {
				_ = os.Unsetenv(k)
			}
		}
	}
}

func (p *pebble) client() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil // loopback only: never consult proxy settings
	tr.TLSClientConfig = &tls.Config{RootCAs: p.caRoots}
	return &http.Client{Transport: tr, Timeout: time.Minute}
}

// close stops the ACME endpoint, waiting for in-flight requests, then the
// VA's task loop.
func (p *pebble) close() {
	p.srv.Close()
	stopVA(p.va, p.log)
}

// stopVA ends the VA's task loop goroutine. Pebble's VA has no Close: its
// constructor starts a goroutine ranging over an unexported channel that is
// never closed. We close that channel through reflection. This is only safe
// once nothing can call ValidateChallenge any more, i.e. after the WFE's
// server has stopped and waited for its handlers. If a future Pebble renames
// the field, the goroutine leaks (one per forge) and this logs why.
func stopVA(v *va.VAImpl, logger *slog.Logger) {
	field := reflect.ValueOf(v).Elem().FieldByName("tasks")
	if !field.IsValid() || field.Kind() != reflect.Chan || field.Type().ChanDir() != reflect.BothDir {
		logger.Warn("cannot stop Pebble's VA task loop: unexpected VAImpl layout; one goroutine leaks")
		return
	}
	reflect.NewAt(field.Type(), unsafe.Pointer(field.UnsafeAddr())).Elem().Close()
}

// selfSignedLoopbackCert makes a fresh self-signed ECDSA certificate for
// 127.0.0.1 and localhost (and extraIP, if not loopback), for the ACME
// endpoint (faster than httptest's shared RSA certificate, and not a
// publicly known key).
func selfSignedLoopbackCert(extraIP net.IP) (tls.Certificate, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "testforge ACME endpoint"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		DNSNames:              []string{"localhost"},
	}
	if extraIP != nil && !extraIP.IsLoopback() {
		tmpl.IPAddresses = append(tmpl.IPAddresses, extraIP)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, leaf, nil
}
