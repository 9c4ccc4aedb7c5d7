package testforge

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// CAProxy is an HTTPS reverse proxy in front of the forge's CA, for what
// Pebble cannot be made to do by itself (rate limits, outages) and to see
// every ACME request as the CA receives it. Point the client at
// [CAProxy.URL] and [CAProxy.Roots]: Pebble builds the URLs it returns
// from the request's Host, which the proxy keeps, so the whole ACME flow
// goes through the proxy.
type CAProxy struct {
	// URL is the ACME directory through the proxy.
	URL string
	// Roots trusts the proxy's TLS certificate (give it with URL to the
	// ACME client); RootPEM is that certificate, PEM encoded.
	Roots   *x509.CertPool
	RootPEM []byte

	f     *Forge
	srv   *http.Server
	up    *http.Transport
	done  chan struct{}
	fault atomic.Pointer[func(http.ResponseWriter, *http.Request) bool]

	mu       sync.Mutex
	reqs     []CARequest
	closed   bool           // guarded by mu
	inflight sync.WaitGroup // handlers running; Add under mu while !closed
}

// CARequest is one request the proxy received.
type CARequest struct {
	Method string
	// Path is the request's path: /dir, /nonce-plz, /order-plz,
	// /authZ/<id>, /chalZ/<id>, /finalize-order/<id>, /my-order/<id>,
	// /certZ/<id>, ...
	Path string
	// Received is when the request arrived at the proxy.
	Received time.Time
	// Status and RetryAfter are of the response sent back.
	Status     int
	RetryAfter string
	// Faulted is true when the fault hook answered instead of the CA.
	Faulted bool
	// Body is the request's body (at most 1 MiB).
	Body []byte
}

// StartCAProxy starts a proxy in front of the forge's CA, on 127.0.0.1.
// Close it when done (before the forge).
func (f *Forge) StartCAProxy() (*CAProxy, error) {
	target, err := url.Parse(f.CAURL)
	if err != nil {
		return nil, err
	}
	target.Path = ""
	cert, leaf, err := selfSignedLoopbackCert(nil)
	if err != nil {
		return nil, fmt.Errorf("testforge: the CA proxy's certificate: %w", err)
	}
	p := &CAProxy{f: f, Roots: x509.NewCertPool(), done: make(chan struct{})}
	p.Roots.AddCert(leaf)
	p.RootPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})
	upstream := f.pebble.client().Transport.(*http.Transport)
	p.up = upstream
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host // Pebble's URLs then name the proxy
		},
		Transport: upstream,
		ErrorLog:  slog.NewLogLogger(f.log.Handler(), slog.LevelDebug),
	}
	srv, err := newLoopbackServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			http.Error(w, "the CA proxy is closed", http.StatusServiceUnavailable)
			return
		}
		p.inflight.Add(1)
		p.mu.Unlock()
		defer p.inflight.Done()
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		req := CARequest{Method: r.Method, Path: r.URL.Path, Received: time.Now()}
		if r.Body != nil {
			req.Body, _ = io.ReadAll(io.LimitReader(r.Body, 1<<20))
			r.Body = io.NopCloser(bytes.NewReader(req.Body))
		}
		if fn := p.fault.Load(); fn != nil && (*fn)(rec, r) {
			req.Faulted = true
		} else {
			rp.ServeHTTP(rec, r)
		}
		req.Status, req.RetryAfter = rec.status, rec.Header().Get("Retry-After")
		p.mu.Lock()
		p.reqs = append(p.reqs, req)
		p.mu.Unlock()
	}), f.log.With("component", "ca-proxy"))
	if err != nil {
		return nil, err
	}
	srv.Config.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	p.srv = srv.Config
	ln := srv.Listener
	p.URL = "https://" + srv.Listener.Addr().String() + strings.TrimPrefix(f.CAURL, target.String())
	go func() {
		defer close(p.done)
		_ = p.srv.ServeTLS(ln, "", "")
	}()
	return p, nil
}

// SetFault installs fn, called for every request before it is proxied; if
// it returns true it has answered and the CA never sees the request. Nil
// removes the hook.
func (p *CAProxy) SetFault(fn func(w http.ResponseWriter, r *http.Request) bool) {
	if fn == nil {
		p.fault.Store(nil)
		return
	}
	p.fault.Store(&fn)
}

// Requests returns the requests received so far, in order.
func (p *CAProxy) Requests() []CARequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.reqs)
}

// Close stops the proxy, waits for its handlers, and closes its connections
// to the CA. It may be called more than once.
//
// http.Server.Close does not wait for handlers: one still proxying a request
// would hand its upstream connection back to the pool after
// CloseIdleConnections and leave it (and Pebble's side of it) running. So
// the handlers are counted and awaited first.
func (p *CAProxy) Close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	_ = p.srv.Close()
	<-p.done
	p.inflight.Wait()
	p.up.CloseIdleConnections()
}

// statusRecorder remembers the status written through it.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
