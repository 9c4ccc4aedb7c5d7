package autotls

import (
	"errors"
	"net/http"
	"time"

	ws "github.com/libp2p/go-libp2p/p2p/transport/websocket"
	ma "github.com/multiformats/go-multiaddr"
)

// Limits of the HTTP server behind [WithHTTPHandler], before
// [WithHTTPServerConfig] changes them.
const (
	// httpReadHeaderTimeout bounds reading a request's headers over
	// HTTP/1.1 (Go's HTTP/2 server has no such limit; IdleTimeout and the
	// TLS handshake timeout bound a silent client there).
	httpReadHeaderTimeout = 10 * time.Second
	// httpIdleTimeout closes a keep-alive connection (HTTP/1.1 or HTTP/2)
	// idle this long.
	httpIdleTimeout = 60 * time.Second
	// httpMaxHeaderBytes bounds a request's header block (nginx's default
	// is 32 KiB; net/http's 1 MiB is more than a peer needs).
	httpMaxHeaderBytes = 64 << 10
)

// WithHTTPHandler serves h on the host's WSS listeners, on the same port
// and with the same certificate: requests that are not WebSocket upgrades
// go to h, over HTTP/2 or HTTP/1.1 as the client's TLS ALPN chooses, while
// WebSocket upgrades still reach libp2p. While the certificate is valid the
// host also announces the HTTP form of each browser address,
//
//	/ip4/<ip>/tcp/<port>/tls/sni/<ip label>.<peerid>.<forge>/http
//	/dns4/<ip label>.<peerid>.<forge>/tcp/<port>/tls/http  (WithShortAddrs)
//
// the form go-libp2p's p2p/http client dials. The server closes
// connections idle for 60 s, waits at most 10 s for a request's headers and
// refuses header blocks over 64 KiB; change that with
// [WithHTTPServerConfig]. h is called from many goroutines at once. Every
// WebSocket listener serves h: WSS ones for your own names
// ([WithTLSConfig]) too, over HTTP/2 only if that tls.Config lists "h2" in
// NextProtos, and a plain /ws one without TLS.
//
// To serve go-libp2p's HTTP protocols (p2p/http), pass the ServeMux of a
// libp2phttp.Host here; see the examples. Without this option, requests
// that are not WebSocket upgrades get 404 and no /http address is
// announced.
func WithHTTPHandler(h http.Handler) Opt {
	return func(c *config) error {
		if h == nil {
			return errors.New("WithHTTPHandler(nil): pass an http.Handler, for example an *http.ServeMux")
		}
		c.httpHandler = h
		return nil
	}
}

// WithHTTPServerConfig lets fn adjust the [http.Server] behind
// [WithHTTPHandler] (timeouts, header limit, HTTP/2 settings), once per
// listener, after the defaults are set. Handler, TLSConfig and ConnContext
// are the transport's and are set again after fn. Without it the defaults
// of [WithHTTPHandler] apply. Given without [WithHTTPHandler], [Option]
// fails: there would be no server to configure.
func WithHTTPServerConfig(fn func(*http.Server)) Opt {
	return func(c *config) error {
		if fn == nil {
			return errors.New("WithHTTPServerConfig(nil): pass a function that adjusts the *http.Server")
		}
		c.httpServerConfig = fn
		return nil
	}
}

var errHTTPConfigAlone = errors.New("WithHTTPServerConfig without WithHTTPHandler configures nothing: add WithHTTPHandler with the handler to serve, or remove WithHTTPServerConfig")

// httpOptions are the WebSocket transport's options for the HTTP handler,
// none without one.
func (m *manager) httpOptions() []ws.Option {
	h := m.cfg.httpHandler
	if h == nil {
		return nil
	}
	user := m.cfg.httpServerConfig
	return []ws.Option{
		ws.WithHTTPHandler(h),
		ws.WithHTTPServerConfig(func(s *http.Server) {
			s.ReadHeaderTimeout = httpReadHeaderTimeout
			s.IdleTimeout = httpIdleTimeout
			s.MaxHeaderBytes = httpMaxHeaderBytes
			if user != nil {
				user(s)
			}
		}),
	}
}

// withHTTPAddr appends to out the HTTP form of fa, an announced browser
// address (…/tls/sni/<name>/ws or …/tls/ws): the same address ending in
// /http instead of /ws. It does nothing without an HTTP handler.
func (m *manager) withHTTPAddr(out []ma.Multiaddr, fa ma.Multiaddr) []ma.Multiaddr {
	if m.cfg.httpHandler == nil || len(fa) == 0 || fa[len(fa)-1].Code() != ma.P_WS {
		return out
	}
	c, err := ma.NewComponent("http", "")
	if err != nil {
		return out
	}
	return append(out, append(fa[:len(fa)-1:len(fa)-1], *c))
}

// isHTTPAddr reports whether a ends in /http: an address for HTTP clients,
// not one a libp2p peer (the broker's dial-back) can dial.
func isHTTPAddr(a ma.Multiaddr) bool {
	return len(a) > 0 && a[len(a)-1].Code() == ma.P_HTTP
}
