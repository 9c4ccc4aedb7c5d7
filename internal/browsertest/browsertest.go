// Package browsertest drives a real browser against a libp2p host: headless
// Chromium loads the demo page of examples/browser, which dials a multiaddr
// with js-libp2p over Secure WebSockets, pings the remote peer, fetch()es a
// URL over HTTPS if given one, and reports the outcome back.
//
// It runs on Linux and needs a Chromium binary, NSS's certutil (Debian:
// chromium and libnss3-tools) and the built page; .ci/browser-setup.sh
// provides all three.
// Tests call [Require] first, which skips them when something is missing,
// except in CI where it fails them.
//
// Everything stays on loopback: the page is served on 127.0.0.1, and the
// browser resolves only the names mapped by [Options.HostRules].
package browsertest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// DefaultTimeout is what [Options.Timeout] means when zero.
const DefaultTimeout = 30 * time.Second

// Result is the outcome the page reports.
type Result struct {
	// OK is true when the dial succeeded and every ping was answered.
	OK bool `json:"ok"`
	// RemotePeer is the PeerID of the dialled host, as the browser
	// authenticated it; empty when the dial failed.
	RemotePeer string `json:"remotePeer"`
	// RTTs are the ping round-trip times in milliseconds, in order.
	RTTs []float64 `json:"rtts"`
	// Error says why when OK is false: js-libp2p's error message, and the
	// reason of a failed TLS handshake when Chromium logged one (a page
	// sees only a bare WebSocket error), e.g. "ERR_CERT_AUTHORITY_INVALID".
	Error string `json:"error"`
	// Fetch is the outcome of fetching [Options.FetchURL], nil without one.
	Fetch *FetchResult `json:"fetch"`
}

// FetchResult is the outcome of the page's fetch() of [Options.FetchURL].
type FetchResult struct {
	// OK is true when the response arrived with a 2xx status.
	OK bool `json:"ok"`
	// Status is the HTTP status, 0 when no response arrived.
	Status int `json:"status"`
	// Protocol is the protocol the browser used, from Resource Timing
	// ("h2", "http/1.1"); empty unless the server sends
	// Timing-Allow-Origin for the page's origin.
	Protocol string `json:"protocol"`
	// Body is the response body as text.
	Body string `json:"body"`
	// Error says why no response arrived, with the reason of a failed TLS
	// handshake when Chromium logged one, as for [Result.Error].
	Error string `json:"error"`
}

// Options says what the browser dials and what it trusts.
type Options struct {
	// Multiaddr is the address the page dials, typically ending in
	// /tls/sni/<name>/ws/p2p/<id> or /dns4/<name>/tcp/<port>/tls/ws/p2p/<id>.
	// It may be empty when FetchURL is set.
	Multiaddr string
	// FetchURL, if set, is an https:// URL the page fetch()es at the same
	// time (cross-origin: the server must send CORS headers), reported in
	// [Result.Fetch].
	FetchURL string
	// TrustRootPEM holds the PEM certificates of the CA roots the browser
	// trusts for TLS server authentication, on top of its built-in ones.
	// Nil trusts nothing extra.
	TrustRootPEM []byte
	// HostRules is the value of Chromium's --host-resolver-rules, e.g.
	// "MAP *.libp2p.direct 127.0.0.1". Every name it does not map, other
	// than 127.0.0.1 and localhost, fails to resolve, so the browser never
	// asks a real nameserver. Empty maps nothing.
	HostRules string
	// Timeout bounds the whole run, from Chromium's start to the report.
	// The page gets two thirds of it for the dial and the pings. Zero means
	// [DefaultTimeout].
	Timeout time.Duration
}

// Chromium returns the path of a Chromium (or Chrome) binary: $CHROME_BIN
// when set, else Debian's binary, else the first of chromium,
// chromium-browser, google-chrome-stable and google-chrome found in $PATH.
// It returns "" when there is none.
func Chromium() string {
	if p := os.Getenv("CHROME_BIN"); p != "" {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
		return ""
	}
	// Debian's /usr/bin/chromium is a shell wrapper that adds flags from
	// /etc/chromium.d; run the binary itself so that only our flags apply.
	for _, name := range []string{"/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome-stable", "google-chrome"} {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	return ""
}

// DistDir returns the absolute path of the built demo page,
// examples/browser/dist in this module, or an error saying how to build it.
func DistDir() (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", fmt.Errorf("browsertest: locating the module: %w", err)
	}
	dist := filepath.Join(root, "examples", "browser", "dist")
	for _, f := range []string{"index.html", "main.js"} {
		built, err := os.Stat(filepath.Join(dist, f))
		if err != nil {
			return "", fmt.Errorf("browsertest: the browser demo is not built (%w); run .ci/browser-setup.sh", err)
		}
		// A page built before its source changed tests the old page.
		src, err := os.Stat(filepath.Join(root, "examples", "browser", f))
		if err == nil && src.ModTime().After(built.ModTime()) {
			return "", fmt.Errorf("browsertest: the browser demo in %s is older than examples/browser/%s; run .ci/browser-setup.sh to rebuild it", dist, f)
		}
	}
	return dist, nil
}

// moduleRoot walks up from the working directory (a package directory under
// go test) to the directory holding go.mod.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Require skips t unless Chromium, certutil and the built page are all
// there. When $CI is set it fails t instead, so CI never skips silently.
// Outside Linux it always skips: Dial runs on Linux only.
func Require(t testing.TB) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("skipping browser test: browsertest runs on Linux only")
	}
	var missing []string
	if Chromium() == "" {
		missing = append(missing, "no chromium binary (set $CHROME_BIN or install Debian's chromium)")
	}
	if _, err := exec.LookPath("certutil"); err != nil {
		missing = append(missing, "no certutil (Debian: libnss3-tools)")
	}
	if _, err := DistDir(); err != nil {
		missing = append(missing, err.Error())
	}
	if len(missing) == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("browser test cannot run in CI: %v; run .ci/browser-setup.sh", missing)
	}
	t.Skipf("skipping browser test: %v; run .ci/browser-setup.sh", missing)
}

// Dial has headless Chromium load the demo page, dial opts.Multiaddr, ping
// the remote peer, fetch opts.FetchURL (if set) meanwhile and report back. It serves the page on an ephemeral port
// of 127.0.0.1, runs Chromium with a fresh profile and a temporary HOME
// whose NSS database trusts opts.TrustRootPEM, and waits for the page's
// report, the timeout or ctx. Chromium and all its processes are killed and
// the temporary directories removed before Dial returns.
//
// A failed dial is a Result with OK false and a nil error; the error is for
// when no report arrived, and then carries the tail of Chromium's stderr.
func Dial(ctx context.Context, opts Options) (Result, error) {
	if opts.Multiaddr == "" && opts.FetchURL == "" {
		return Result{}, errors.New("browsertest: no multiaddr to dial and no URL to fetch")
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()

	chromium := Chromium()
	if chromium == "" {
		return Result{}, errors.New("browsertest: no chromium binary; run .ci/browser-setup.sh")
	}
	dist, err := DistDir()
	if err != nil {
		return Result{}, err
	}

	tmp, err := os.MkdirTemp(tempBase(), "browsertest-")
	if err != nil {
		return Result{}, fmt.Errorf("browsertest: %w", err)
	}
	defer os.RemoveAll(tmp)
	home := filepath.Join(tmp, "home")
	if err := newNSSDB(ctx, home, opts.TrustRootPEM); err != nil {
		return Result{}, fmt.Errorf("browsertest: %w", err)
	}

	page, err := servePage(dist)
	if err != nil {
		return Result{}, fmt.Errorf("browsertest: %w", err)
	}
	defer page.close()

	q := url.Values{
		"report":  {page.url + "/report"},
		"timeout": {fmt.Sprint((opts.Timeout * 2 / 3).Milliseconds())},
	}
	if opts.Multiaddr != "" {
		q.Set("ma", opts.Multiaddr)
	}
	if opts.FetchURL != "" {
		q.Set("http", opts.FetchURL)
	}
	b, err := startBrowser(chromium, tmp, home, opts.HostRules, page.url+"/?"+q.Encode())
	if err != nil {
		return Result{}, fmt.Errorf("browsertest: %w", err)
	}
	defer b.kill()

	var (
		r      Result
		failed string // why no report came, if none did
	)
	select {
	case r = <-page.reports:
	case <-b.done:
		failed = fmt.Sprintf("chromium exited before the page reported (%v)", b.err)
	case <-ctx.Done():
		failed = fmt.Sprintf("no report from the page: %v", context.Cause(ctx))
	}
	// Once Chromium is gone its log has been read to the end.
	b.kill()
	log := b.stderr.String()
	if failed != "" {
		return Result{}, fmt.Errorf("browsertest: %s; chromium's stderr:\n%s", failed, withoutNoise(log))
	}
	why := tlsFailures(log)
	if !r.OK && why != "" && opts.Multiaddr != "" {
		r.Error += " (" + why + ")"
	}
	if r.Fetch != nil && !r.Fetch.OK && why != "" {
		r.Fetch.Error += " (" + why + ")"
	}
	return r, nil
}

// tempBase is where Dial makes its temporary directory: os.TempDir(), or
// /tmp when that is too long a path for the Unix sockets Chromium makes in
// its TMPDIR (at most 107 bytes; Chromium aborts at start otherwise).
func tempBase() string {
	// <base>/browsertest-<10 digits>/tmp/org.chromium.Chromium.<6>/SingletonSocket
	const room = 107 - len("/browsertest-0123456789/tmp/org.chromium.Chromium.XXXXXX/SingletonSocket")
	if base := os.TempDir(); len(base) <= room {
		return base
	}
	return "/tmp"
}

// pageServer serves the built page and accepts the page's report at
// POST /report on an ephemeral port of 127.0.0.1.
type pageServer struct {
	url     string      // http://127.0.0.1:<port>
	reports chan Result // the first report; later ones are dropped
	srv     *http.Server
	done    chan struct{} // closed when Serve has returned
}

func servePage(dist string) (*pageServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listening for the page: %w", err)
	}
	s := &pageServer{
		url:     "http://" + ln.Addr().String(),
		reports: make(chan Result, 1),
		done:    make(chan struct{}),
	}
	mux := http.NewServeMux()
	mux.Handle("GET /", http.FileServer(http.Dir(dist)))
	mux.HandleFunc("POST /report", s.report)
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(s.done)
		s.srv.Serve(ln) //nolint:errcheck // always ErrServerClosed, after close
	}()
	return s, nil
}

func (s *pageServer) report(w http.ResponseWriter, r *http.Request) {
	var res Result
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&res); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	select {
	case s.reports <- res:
	default:
	}
	w.WriteHeader(http.StatusNoContent)
}

// close stops the server, drops its connections and waits for Serve.
func (s *pageServer) close() {
	s.srv.Close()
	<-s.done
}
