package autotls

// Benchmarks of the figures in design.md ("What must hold"), against the
// in-process forge on loopback. docs/performance.md has the figures, the
// machine and the commands. Each benchmark reports its figures with
// b.ReportMetric; no timing is asserted anywhere.
//
// The hosts run with the production defaults (poll intervals, backoffs),
// only pointed at the forge: benchOpts, unlike forgeOpts, sets no test
// knob.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/gologshim"
	"github.com/miekg/dns"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

var benchLogger = slog.New(slog.DiscardHandler)

// quietLibp2p sends go-libp2p's own logs to a discard handler. Its
// loggers write to stderr, which go test interleaves with the benchmark
// lines: "swarm listener accept error ... listener closed", at error level
// each time a host with a WSS listener closes, used to split the
// BenchmarkRestart line in two, which benchstat then cannot read. Each
// logger picks its handler when it is first used, so this holds only for
// loggers no test has used yet: run the benchmarks with -run '^$'.
func quietLibp2p() { gologshim.SetDefaultHandler(slog.DiscardHandler) }

// benchOpts are the production defaults pointed at the forge.
func benchOpts(f *testforge.Forge, extra ...Opt) []Opt {
	return append([]Opt{
		WithForgeDomain(f.Domain),
		WithRegistrationEndpoint(f.BrokerURL),
		WithCA(f.CAURL, f.CARoots),
		WithAllowPrivateAddrs(),
		WithResolver(f.Resolver()),
		WithLogger(benchLogger),
	}, extra...)
}

// benchHost builds a loopback host with autotls pointed at f. The caller
// closes it.
func benchHost(b *testing.B, f *testforge.Forge, key crypto.PrivKey, opts ...Opt) host.Host {
	b.Helper()
	all := append(f.HostOptions(), libp2p.Identity(key), Option(benchOpts(f, opts...)...))
	h, err := libp2p.New(all...)
	if err != nil {
		b.Fatalf("libp2p.New: %v", err)
	}
	return h
}

func benchKey(b *testing.B) crypto.PrivKey {
	b.Helper()
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	return k
}

// nextCert waits for the host's next certificate event on sub.
func nextCert(b *testing.B, sub <-chan any, timeout time.Duration) time.Time {
	b.Helper()
	select {
	case <-sub:
		return time.Now()
	case <-time.After(timeout):
		b.Fatalf("no certificate within %v", timeout)
	}
	return time.Time{}
}

// ---- Phase tracing ----

// Phases of one issuance, in order; each ends where the next begins, so
// they add up to the time to certificate.
var phaseNames = []string{
	"host",     // libp2p.New: build and start the host
	"health",   // the run loop's gates and the broker health check, after New returned
	"prep",     // lock, storage check, key, CSR
	"account",  // ACME account registration (fresh identity, fresh storage)
	"order",    // new order and its authorization
	"register", // PeerID auth and registration: the broker dials back
	"txt",      // until the TXT record is visible
	"validate", // challenge initiated, authorization polled until valid
	"finalize", // finalize, order polled until valid, chain downloaded
	"store",    // the manager checks, stores and serves it
}

// issuanceTrace records one host's issuance from the outside: the CA
// requests of its issuer's client and the requests of its broker client.
// The phase boundaries are read off those requests (Pebble's paths name
// each ACME step), so that production code carries no trace hook.
type issuanceTrace struct {
	start, built, health time.Time
	loaded               time.Time
	storage              storageCounts

	mu     sync.Mutex
	ca     []caRequest
	broker []caRequest
}

// caRequest is one HTTP request as a client of the host saw it.
type caRequest struct {
	url        string
	start, end time.Time
	retryAfter string
}

// first returns the start of the first request whose URL contains part,
// and the end of the last one.
func firstLast(reqs []caRequest, part string) (first, last time.Time) {
	for _, r := range reqs {
		if strings.Contains(r.url, part) {
			if first.IsZero() {
				first = r.start
			}
			last = r.end
		}
	}
	return first, last
}

// marks returns the phase boundaries, a missing point taking the time of
// the next one (so its phase reads zero). The run loop starts inside
// libp2p.New, so the health check can end before New returns: a boundary
// is never earlier than the one before it (that phase then reads zero and
// its time counts in the one before).
func (t *issuanceTrace) marks() []time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	var issue time.Time
	if len(t.ca) > 0 {
		issue = t.ca[0].start
	}
	account, _ := firstLast(t.ca, "/order-plz")
	registerStart, registerEnd := firstLast(t.broker, "/_acme-challenge")
	validate, _ := firstLast(t.ca, "/chalZ/")
	finalize, _ := firstLast(t.ca, "/finalize-order/")
	_, issued := firstLast(t.ca, "/certZ/")
	m := []time.Time{t.start, t.built, t.health, issue, account, registerStart, registerEnd, validate, finalize, issued, t.loaded}
	for i := len(m) - 2; i >= 0; i-- {
		if m[i].IsZero() {
			m[i] = m[i+1]
		}
	}
	for i := 1; i < len(m); i++ {
		if m[i].Before(m[i-1]) {
			m[i] = m[i-1]
		}
	}
	return m
}

// phases returns each phase's duration in milliseconds.
func (t *issuanceTrace) phases() []float64 {
	m := t.marks()
	out := make([]float64, len(m)-1)
	for i := range out {
		out[i] = ms(m[i+1].Sub(m[i]))
	}
	return out
}

// install records the issuer's CA requests into t. It runs on the
// manager's run goroutine (from the first broker health check, which comes
// before any issuance), so that the transport is replaced by the goroutine
// that uses it.
func (t *issuanceTrace) install(m *manager) {
	hc := m.issuer.client.HTTPClient
	hc.Transport = &caRecorder{next: hc.Transport, t: t, into: &t.ca}
}

type caRecorder struct {
	next http.RoundTripper
	t    *issuanceTrace
	into *[]caRequest
}

func (r *caRecorder) CloseIdleConnections() {
	r.next.(interface{ CloseIdleConnections() }).CloseIdleConnections()
}

func (r *caRecorder) RoundTrip(req *http.Request) (*http.Response, error) {
	rec := caRequest{url: req.URL.String(), start: time.Now()}
	resp, err := r.next.RoundTrip(req)
	rec.end = time.Now()
	if resp != nil {
		rec.retryAfter = resp.Header.Get("Retry-After")
	}
	r.t.mu.Lock()
	*r.into = append(*r.into, rec)
	r.t.mu.Unlock()
	return resp, err
}

// retryAfterSlack returns, for every CA response that carried a
// Retry-After, how long after the time it named the client's next request
// to the same URL started (negative: earlier).
func (t *issuanceTrace) retryAfterSlack() []time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []time.Duration
	for i, r := range t.ca {
		if r.retryAfter == "" {
			continue
		}
		d, ok := parseRetryAfter(r.retryAfter, r.end)
		if !ok {
			continue
		}
		if i+1 < len(t.ca) { // the issuer is sequential: the next request is the poll
			out = append(out, t.ca[i+1].start.Sub(r.end.Add(d)))
		}
	}
	return out
}

// tracedHTTPClient is the broker HTTP client of a traced host: on the
// first health check it installs t into the manager *m, and it records
// when that check ended. The caller closes tr's idle connections.
func tracedHTTPClient(m **manager, t *issuanceTrace, tr *http.Transport) *http.Client {
	var once sync.Once
	broker := &caRecorder{next: tr, t: t, into: &t.broker}
	return &http.Client{Timeout: time.Minute, Transport: roundTripFunc(func(req *http.Request) (*http.Response, error) {
		health := strings.HasSuffix(req.URL.Path, healthPath)
		if health {
			once.Do(func() { t.install(*m) })
		}
		resp, err := broker.RoundTrip(req)
		if health && t.health.IsZero() {
			t.health = time.Now()
		}
		return resp, err
	})}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// tracedIssue builds a host with a fresh identity and the given (empty)
// storage, waits for its certificate and closes it. It returns the trace
// and the forge's requests during the issuance; the storage calls of the
// host's whole life (one issuance) are counted into t.storage.
func tracedIssue(b *testing.B, f *testforge.Forge, store certmagic.Storage) (*issuanceTrace, testforge.Stats) {
	b.Helper()
	key := benchKey(b)
	t := &issuanceTrace{}
	store = &countingStorage{Storage: store, n: &t.storage}
	var m *manager
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil
	before := f.Stats()
	t.start = time.Now()
	h := benchHost(b, f, key, WithStorage(store),
		WithHTTPClient(tracedHTTPClient(&m, t, tr)),
		withManager(func(x *manager) { m = x }))
	t.built = time.Now()
	sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		b.Fatal(err)
	}
	t.loaded = nextCert(b, sub.Out(), time.Minute)
	after := f.Stats()
	sub.Close()
	b.StopTimer()
	_ = h.Close()
	tr.CloseIdleConnections()
	b.StartTimer()
	return t, statsDelta(after, before)
}

// floorIssue is the bare ACME flow for a fresh identity: acmez alone, the
// TXT written straight into the forge's DNS store.
func floorIssue(b *testing.B, f *testforge.Forge) (time.Duration, testforge.Stats) {
	b.Helper()
	_, pub, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		b.Fatal(err)
	}
	certKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	before := f.Stats()
	start := time.Now()
	if _, err := f.IssueDirect(context.Background(), id, certKey); err != nil {
		b.Fatalf("IssueDirect: %v", err)
	}
	d := time.Since(start)
	return d, statsDelta(f.Stats(), before)
}

func statsDelta(a, b testforge.Stats) testforge.Stats {
	return testforge.Stats{
		Health:     a.Health - b.Health,
		Challenge:  a.Challenge - b.Challenge,
		Registered: a.Registered - b.Registered,
		CA:         a.CA - b.CA,
		DNS:        a.DNS - b.DNS,
		DNSTXT:     a.DNSTXT - b.DNSTXT,
	}
}

// storageCounts counts calls to a certmagic.Storage.
type storageCounts struct {
	reads   atomic.Int64 // Load, Exists, Stat, List
	writes  atomic.Int64 // Store
	dels    atomic.Int64 // Delete
	locks   atomic.Int64 // Lock
	unlocks atomic.Int64 // Unlock
}

// total is every call counted: one SQL statement each on PostgreSQL.
func (c *storageCounts) total() int64 {
	return c.reads.Load() + c.writes.Load() + c.dels.Load() + c.locks.Load() + c.unlocks.Load()
}

// countingStorage counts the calls to the certmagic.Storage it wraps. It
// hides the store's optional interfaces (certmagic.TryLocker): issuance
// does not use them, ours or (before the core rebuild) certmagic's.
type countingStorage struct {
	certmagic.Storage
	n *storageCounts
}

func (s *countingStorage) Load(ctx context.Context, key string) ([]byte, error) {
	s.n.reads.Add(1)
	return s.Storage.Load(ctx, key)
}

func (s *countingStorage) Exists(ctx context.Context, key string) bool {
	s.n.reads.Add(1)
	return s.Storage.Exists(ctx, key)
}

func (s *countingStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	s.n.reads.Add(1)
	return s.Storage.Stat(ctx, key)
}

func (s *countingStorage) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	s.n.reads.Add(1)
	return s.Storage.List(ctx, path, recursive)
}

func (s *countingStorage) Store(ctx context.Context, key string, value []byte) error {
	s.n.writes.Add(1)
	return s.Storage.Store(ctx, key, value)
}

func (s *countingStorage) Delete(ctx context.Context, key string) error {
	s.n.dels.Add(1)
	return s.Storage.Delete(ctx, key)
}

func (s *countingStorage) Lock(ctx context.Context, name string) error {
	s.n.locks.Add(1)
	return s.Storage.Lock(ctx, name)
}

func (s *countingStorage) Unlock(ctx context.Context, name string) error {
	s.n.unlocks.Add(1)
	return s.Storage.Unlock(ctx, name)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func mean(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	var sum float64
	for _, x := range xs {
		sum += x
	}
	return sum / float64(len(xs))
}

// ---- Time to certificate ----

// BenchmarkTimeToCertificate measures a fresh identity's full flow,
// libp2p.New with Option to EvtCertificateLoaded, and in the same run the
// floor: the bare ACME flow (testforge's IssueDirect: acmez alone, TXT
// written straight into the forge's DNS, no broker). ns/op is ours alone.
//
// Metrics: ms (median), floor-ms (median), x-floor (ratio of the medians),
// over-floor-ms (difference of the medians), <phase>-ms (means; they add
// up to the mean), broker/CA/DNS requests per certificate (ours and the
// floor's CA and DNS requests), and the host's storage calls per
// certificate: storage-reads/op (Load, Exists, Stat, List), -writes/op
// (Store), -deletes/op, -locks/op (Lock). pebble keeps the certificate in memory,
// pebble-disk in a directory (storage.Dir, the production default's kind).
// With retry-after, the CA sends Retry-After (1 s) on authorization and
// order polls, and its TXT lookups are slowed by raTXTDelay so that both
// kinds of poll get one; ra-waits/op counts them and ra-late-ms is the mean
// delay between the time a Retry-After named and the next request (what
// the client adds on top of the CA's wait).
func BenchmarkTimeToCertificate(b *testing.B) {
	quietLibp2p()
	for _, mode := range []struct {
		name string
		cfg  testforge.Config
		disk bool
	}{
		{"pebble", testforge.Config{}, false},
		{"pebble-disk", testforge.Config{}, true},
		{"retry-after", testforge.Config{RetryAfterAuthz: 1, RetryAfterOrder: 1}, false},
	} {
		b.Run(mode.name, func(b *testing.B) {
			f := startForge(b, mode.cfg)
			newStore := func() certmagic.Storage { return storage.Memory() }
			if mode.disk {
				newStore = func() certmagic.Storage {
					s, err := storage.Dir(b.TempDir())
					if err != nil {
						b.Fatal(err)
					}
					return s
				}
			}
			if mode.cfg.RetryAfterAuthz == 0 {
				// Warm up: acmez's directory cache, and the code paths.
				// Not measured.
				tracedIssue(b, f, newStore())
				floorIssue(b, f)
			} else {
				// Slow the CA's validation down (its TXT lookup), so that
				// the first authorization poll finds it still processing
				// and gets a Retry-After too, as the order poll does.
				f.SetDNSFault(func(q dns.Question) testforge.DNSFault {
					if q.Qtype == dns.TypeTXT && strings.HasPrefix(q.Name, "_acme-challenge.") {
						return testforge.DNSFault{Delay: raTXTDelay}
					}
					return testforge.DNSFault{}
				})
			}
			var ours, floor []float64
			phases := make([][]float64, len(phaseNames))
			var st, fst testforge.Stats
			var late []float64
			var reads, writes, dels, locks int64
			b.ResetTimer()
			for range b.N {
				t, s := tracedIssue(b, f, newStore())
				b.StopTimer()
				d, fs := floorIssue(b, f)
				b.StartTimer()
				ours = append(ours, ms(t.loaded.Sub(t.start)))
				floor = append(floor, ms(d))
				for i, p := range t.phases() {
					phases[i] = append(phases[i], p)
				}
				for _, l := range t.retryAfterSlack() {
					late = append(late, ms(l))
				}
				st = addStats(st, s)
				fst = addStats(fst, fs)
				reads += t.storage.reads.Load()
				writes += t.storage.writes.Load()
				dels += t.storage.dels.Load()
				locks += t.storage.locks.Load()
			}
			b.StopTimer()
			n := float64(b.N)
			b.ReportMetric(median(ours), "ms")
			b.ReportMetric(median(floor), "floor-ms")
			b.ReportMetric(median(ours)/median(floor), "x-floor")
			b.ReportMetric(median(ours)-median(floor), "over-floor-ms")
			for i, name := range phaseNames {
				b.ReportMetric(mean(phases[i]), name+"-ms")
			}
			b.ReportMetric(float64(st.Health+st.Challenge)/n, "broker-req/op")
			b.ReportMetric(float64(st.CA)/n, "ca-req/op")
			b.ReportMetric(float64(st.DNS)/n, "dns-req/op")
			b.ReportMetric(float64(fst.CA)/n, "floor-ca-req/op")
			b.ReportMetric(float64(fst.DNS)/n, "floor-dns-req/op")
			b.ReportMetric(float64(reads)/n, "storage-reads/op")
			b.ReportMetric(float64(writes)/n, "storage-writes/op")
			b.ReportMetric(float64(dels)/n, "storage-deletes/op")
			b.ReportMetric(float64(locks)/n, "storage-locks/op")
			if mode.cfg.RetryAfterAuthz > 0 {
				b.ReportMetric(float64(len(late))/n, "ra-waits/op")
				b.ReportMetric(mean(late), "ra-late-ms")
			}
		})
	}
}

// raTXTDelay is how late the forge's DNS answers challenge TXT queries in
// the retry-after case: the CA's lookup, and the solver's own check too
// (which adds it once to over-floor-ms there).
const raTXTDelay = 20 * time.Millisecond

func addStats(a, b testforge.Stats) testforge.Stats {
	return testforge.Stats{
		Health:     a.Health + b.Health,
		Challenge:  a.Challenge + b.Challenge,
		Registered: a.Registered + b.Registered,
		CA:         a.CA + b.CA,
		DNS:        a.DNS + b.DNS,
		DNSTXT:     a.DNSTXT + b.DNSTXT,
	}
}

// ---- Restart ----

// BenchmarkRestart measures a restart with a stored certificate, from
// libp2p.New to the browser address announced, against a plain host
// without the option (libp2p.New), alternating in the same run. ns/op is
// the pair.
func BenchmarkRestart(b *testing.B) {
	quietLibp2p()
	f := startForge(b, testforge.Config{})
	key, store := storedCert(b, f)

	var plain, stored []float64
	before := f.Stats()
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		p, err := libp2p.New(append(f.HostOptions(), libp2p.Identity(key))...)
		if err != nil {
			b.Fatal(err)
		}
		plain = append(plain, ms(time.Since(start)))
		b.StopTimer()
		_ = p.Close()
		b.StartTimer()

		h, d := restartHost(b, f, key, store)
		stored = append(stored, ms(d))
		b.StopTimer()
		_ = h.Close()
		b.StartTimer()
	}
	b.StopTimer()
	st := statsDelta(f.Stats(), before)
	n := float64(b.N)
	b.ReportMetric(mean(plain), "plain-ms")
	b.ReportMetric(mean(stored), "stored-ms")
	b.ReportMetric(mean(stored)-mean(plain), "over-plain-ms")
	b.ReportMetric(median(stored)-median(plain), "over-plain-median-ms")
	b.ReportMetric(float64(st.Health+st.Challenge)/n, "broker-req/op")
	b.ReportMetric(float64(st.CA)/n, "ca-req/op")
	b.ReportMetric(float64(st.DNS)/n, "dns-req/op")
}

// restartHost starts a host with identity key on store, which holds its
// certificate, and returns it with the time until its browser address
// was announced.
func restartHost(b *testing.B, f *testforge.Forge, key crypto.PrivKey, store certmagic.Storage) (host.Host, time.Duration) {
	b.Helper()
	start := time.Now()
	h := benchHost(b, f, key, WithStorage(store))
	for len(browserAddrs(h, f.Domain)) == 0 {
		if time.Since(start) > 10*time.Second {
			b.Fatalf("no browser address announced; have %v", h.Addrs())
		}
		time.Sleep(50 * time.Microsecond)
	}
	return h, time.Since(start)
}

// storedCert has a host obtain a certificate into a new in-memory storage
// and close, and returns its key and that storage: a restart from them
// serves the stored certificate.
func storedCert(b *testing.B, f *testforge.Forge) (crypto.PrivKey, certmagic.Storage) {
	b.Helper()
	key := benchKey(b)
	store := storage.Memory()
	h := benchHost(b, f, key, WithStorage(store))
	sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		b.Fatal(err)
	}
	nextCert(b, sub.Out(), time.Minute)
	sub.Close()
	_ = h.Close()
	return key, store
}

// ---- Handshakes ----

// BenchmarkHandshake measures full TLS handshakes (TLS 1.3, no
// resumption) over loopback TCP against a listener with the WSS
// listeners' TLS config (the manager's tlsConfig: GetCertificate per
// handshake) and one with a static-certificate crypto/tls config holding
// the same certificate, alternating one by one in the same run; the rates
// are from the median handshake times. The client skips verification so
// that the figure is the server's. ns/op is one handshake of each.
func BenchmarkHandshake(b *testing.B) {
	quietLibp2p()
	f := startForge(b, testforge.Config{})
	var m *manager
	h := benchHost(b, f, benchKey(b), WithStorage(storage.Memory()), withManager(func(x *manager) { m = x }))
	defer h.Close()
	sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		b.Fatal(err)
	}
	nextCert(b, sub.Out(), time.Minute)
	sub.Close()

	ours := tlsServer(b, m.tlsConfig())
	static := tlsServer(b, &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*m.cert.Load().tls}})
	client := &tls.Config{
		ServerName:         "127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + f.Domain,
		InsecureSkipVerify: true, // measure the server, not the client's chain checks
		MinVersion:         tls.VersionTLS12,
	}
	handshake := func(addr string) {
		conn, err := tls.Dial("tcp", addr, client)
		if err != nil {
			b.Fatal(err)
		}
		conn.Close()
	}
	handshake(ours)
	handshake(static)

	// Alternate one by one and compare medians, so that load from other
	// processes on the machine hits both alike.
	tOurs := make([]float64, 0, b.N)
	tStatic := make([]float64, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		first, second := ours, static
		if i%2 == 1 {
			first, second = static, ours
		}
		t0 := time.Now()
		handshake(first)
		t1 := time.Now()
		handshake(second)
		t2 := time.Now()
		a, c := t1.Sub(t0).Seconds(), t2.Sub(t1).Seconds()
		if i%2 == 1 {
			a, c = c, a
		}
		tOurs = append(tOurs, a)
		tStatic = append(tStatic, c)
	}
	b.StopTimer()
	b.ReportMetric(1/median(tOurs), "ours-hs/s")
	b.ReportMetric(1/median(tStatic), "static-hs/s")
	b.ReportMetric(median(tStatic)/median(tOurs), "ratio")
}

// tlsServer serves TLS handshakes with cfg on a loopback port until the
// benchmark ends, and returns its address.
func tlsServer(b *testing.B, cfg *tls.Config) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	b.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				conn := tls.Server(c, cfg)
				_ = conn.Handshake()
				conn.Close()
			})
		}
	})
	return ln.Addr().String()
}

// ---- Fleet ----

// BenchmarkFleet starts 1, 10 and 50 hosts at once in one process, each
// with a fresh identity, all sharing one in-memory store (so that shared
// locks would show), and waits until every one has its certificate. Each
// op also issues for one host alone first, for x-one (the fleet's time over
// one host's). live-KB/host is the live heap after a GC with every host
// up, minus before, per host (the forge's growth included); alloc-KB/host
// is everything allocated meanwhile, per host. cpu-ms/host is the CPU time
// the process used meanwhile (the forge's included) per host, and cpu-util
// that time over GOMAXPROCS × the elapsed time: near 1, the hosts are
// limited by the CPUs, not by waiting on one another.
func BenchmarkFleet(b *testing.B) {
	quietLibp2p()
	for _, n := range []int{1, 10, 50} {
		b.Run(fmt.Sprintf("hosts=%d", n), func(b *testing.B) {
			f := startForge(b, testforge.Config{})
			tracedIssue(b, f, storage.Memory()) // warm up
			var totals, ones, live, alloc, cpu, util []float64
			b.ResetTimer()
			for range b.N {
				if n > 1 {
					b.StopTimer()
					t, _ := tracedIssue(b, f, storage.Memory())
					ones = append(ones, ms(t.loaded.Sub(t.start)))
					b.StartTimer()
				}
				r := fleet(b, f, n)
				totals = append(totals, ms(r.total))
				live = append(live, r.live/1024)
				alloc = append(alloc, r.alloc/1024)
				if r.avail > 0 {
					cpu = append(cpu, ms(r.busy)/float64(n))
					util = append(util, r.busy.Seconds()/r.avail.Seconds())
				}
			}
			b.StopTimer()
			b.ReportMetric(median(totals), "total-ms")
			if n > 1 {
				b.ReportMetric(median(totals)/median(ones), "x-one")
			}
			b.ReportMetric(median(live), "live-KB/host")
			b.ReportMetric(median(alloc), "alloc-KB/host")
			if len(cpu) > 0 {
				b.ReportMetric(median(cpu), "cpu-ms/host")
				b.ReportMetric(median(util), "cpu-util")
			}
		})
	}
}

// fleetRun is one fleet's figures.
type fleetRun struct {
	total       time.Duration // until the last certificate
	live, alloc float64       // bytes per host
	busy, avail time.Duration // CPU time used, and available (GOMAXPROCS × total); 0 if unknown
}

// fleet starts n hosts at once and waits for all their certificates.
func fleet(b *testing.B, f *testforge.Forge, n int) fleetRun {
	b.Helper()
	keys := make([]crypto.PrivKey, n)
	for i := range keys {
		keys[i] = benchKey(b)
	}
	store := storage.Memory()
	b.StopTimer()
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	b.StartTimer()

	hosts := make([]host.Host, n)
	errs := make(chan error, n)
	cpu0, cpuOK := testforge.ProcessCPUTime()
	start := time.Now()
	for i := range n {
		go func() {
			h, err := libp2p.New(append(f.HostOptions(), libp2p.Identity(keys[i]), Option(benchOpts(f, WithStorage(store))...))...)
			if err != nil {
				errs <- err
				return
			}
			hosts[i] = h
			sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
			if err != nil {
				errs <- err
				return
			}
			defer sub.Close()
			select {
			case <-sub.Out():
				errs <- nil
			case <-time.After(2 * time.Minute):
				errs <- fmt.Errorf("host %d: no certificate", i)
			}
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
	total := time.Since(start)
	cpu1, _ := testforge.ProcessCPUTime()
	b.StopTimer()
	runtime.GC()
	runtime.ReadMemStats(&m1)
	for _, h := range hosts {
		_ = h.Close()
	}
	b.StartTimer()
	r := fleetRun{
		total: total,
		live:  (float64(m1.HeapAlloc) - float64(m0.HeapAlloc)) / float64(n),
		alloc: float64(m1.TotalAlloc-m0.TotalAlloc) / float64(n),
	}
	if cpuOK {
		r.busy = cpu1 - cpu0
		r.avail = total * time.Duration(runtime.GOMAXPROCS(0))
	}
	return r
}

// ---- Address propagation ----

// BenchmarkAddressPropagation measures how long a peer connected over TCP
// before the certificate exists takes to see the browser address in its
// peerstore (identify push), from the moment the manager has stored the
// issued certificate (its last write of the pair, the metadata), just
// before it serves it. The broker's health check is held until the peer is
// connected, so the certificate always comes after.
func BenchmarkAddressPropagation(b *testing.B) {
	quietLibp2p()
	f := startForge(b, testforge.Config{})
	var prop []float64
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		release := make(chan struct{})
		f.SetBrokerFault(func(_ http.ResponseWriter, r *http.Request) bool {
			if r.URL.Path == healthPath {
				<-release
			}
			return false
		})
		key := benchKey(b)
		id, err := peer.IDFromPrivateKey(key)
		if err != nil {
			b.Fatal(err)
		}
		ls := &storeClock{Storage: storage.Memory(), key: certmagic.StorageKeys.SiteMeta(issuerKey(f.CAURL), certName(id, f.Domain))}
		h := benchHost(b, f, key, WithStorage(ls))
		d, err := libp2p.New(f.DialerOptions()...)
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := d.Connect(ctx, peer.AddrInfo{ID: h.ID(), Addrs: tcpAddrs(h)}); err != nil {
			b.Fatal(err)
		}
		cancel()
		b.StartTimer()
		close(release)
		var seen time.Time
		for deadline := time.Now().Add(30 * time.Second); ; {
			if hasForgeAddr(d.Peerstore().Addrs(h.ID()), f.Domain) {
				seen = time.Now()
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("the peer never saw a browser address; it has %v", d.Peerstore().Addrs(h.ID()))
			}
			time.Sleep(100 * time.Microsecond)
		}
		b.StopTimer()
		prop = append(prop, ms(seen.Sub(ls.at(b))))
		f.SetBrokerFault(nil)
		_ = d.Close()
		_ = h.Close()
		b.StartTimer()
	}
	b.StopTimer()
	b.ReportMetric(median(prop), "ms")
	b.ReportMetric(slices.Max(prop), "max-ms")
}

func tcpAddrs(h host.Host) []ma.Multiaddr {
	var out []ma.Multiaddr
	for _, a := range h.Addrs() {
		if _, err := a.ValueForProtocol(ma.P_TCP); err == nil && !strings.Contains(a.String(), "/ws") {
			out = append(out, a)
		}
	}
	return out
}

func hasForgeAddr(addrs []ma.Multiaddr, forge string) bool {
	for _, a := range addrs {
		if strings.Contains(a.String(), "."+forge+"/") {
			return true
		}
	}
	return false
}

// storeClock is a store that remembers when key was last written
// successfully. (Before the core rebuild the manager read the certificate
// back from storage to serve it, and the mark was that read; now the
// issued pair moves by return value, and nothing reads it.)
type storeClock struct {
	certmagic.Storage
	key  string
	last atomic.Int64
}

func (s *storeClock) Store(ctx context.Context, key string, value []byte) error {
	err := s.Storage.Store(ctx, key, value)
	if err == nil && key == s.key {
		s.last.Store(time.Now().UnixNano())
	}
	return err
}

// at returns when key was last written; it fails b if it never was.
func (s *storeClock) at(b *testing.B) time.Time {
	b.Helper()
	n := s.last.Load()
	if n == 0 {
		b.Fatalf("%s was never stored", s.key)
	}
	return time.Unix(0, n)
}
