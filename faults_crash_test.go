package autotls

// Crash tests: a real child process killed in the middle of storing a
// certificate, and the restart that follows.

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// crashEnv carries the setup of TestFaultCrashRestart's child process.
const crashEnv = "AUTOTLS_TEST_CRASH_CHILD"

type crashSetup struct {
	Domain, BrokerURL, CAURL, DNSAddr, Dir string
	CARootPEM, Key                         []byte
	// Now, if not zero, starts the child on a fake clock reading Now,
	// with no horizon; else it runs on the real clock.
	Now time.Time
	// CrashOn is the end of the key of the site file whose Store crashes
	// the child; empty: the first site file stored.
	CrashOn string
}

// crashingStorage stores like its Storage until asked to store a site's
// certificate, key or metadata whose key ends with suffix: then the
// process exits at once, as if it had been killed there.
type crashingStorage struct {
	certmagic.Storage
	suffix string
}

func (s crashingStorage) Store(ctx context.Context, key string, value []byte) error {
	if strings.HasPrefix(key, "certificates/") && strings.HasSuffix(key, s.suffix) {
		os.Exit(3)
	}
	return s.Storage.Store(ctx, key, value)
}

// runCrashChild runs TestFaultCrashChild in a child process with setup,
// and fails the test unless it crashed where it should (exit status 3).
func runCrashChild(t *testing.T, setup crashSetup) {
	t.Helper()
	raw, err := json.Marshal(setup)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestFaultCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashEnv+"="+string(raw))
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 3 {
		t.Fatalf("the child did not crash where it should (%v):\n%s", err, out)
	}
}

// pendingGlob matches the pending orders stored in dir.
func pendingGlob(dir string) string {
	return filepath.Join(dir, "autotls", "acme", "*", "pending", "*.json")
}

// lockProbe is a storage.Dir store that notes, each time the lock is
// asked for, what the lock file held and whether the lock was free at
// once (TryLock), before it waits for it.
type lockProbe struct {
	certmagic.Storage
	file string

	mu   sync.Mutex
	seen []lockSeen
}

type lockSeen struct {
	content []byte // the lock file's; nil if there was none
	atOnce  bool
}

func (p *lockProbe) Lock(ctx context.Context, name string) error {
	content, _ := os.ReadFile(p.file)
	var ok bool
	var err error
	if tl, can := p.Storage.(certmagic.TryLocker); can {
		ok, err = tl.TryLock(ctx, name)
	}
	p.mu.Lock()
	p.seen = append(p.seen, lockSeen{content, ok})
	p.mu.Unlock()
	if err != nil || ok {
		return err
	}
	return p.Storage.Lock(ctx, name)
}

func (p *lockProbe) calls() []lockSeen {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.seen)
}

// TestFaultCrashChild is the process TestFaultCrashRestart kills: it is
// skipped unless run by it.
func TestFaultCrashChild(t *testing.T) {
	raw := os.Getenv(crashEnv)
	if raw == "" {
		t.Skip("the process TestFaultCrashRestart crashes")
	}
	var s crashSetup
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		t.Fatal(err)
	}
	key, err := crypto.UnmarshalPrivateKey(s.Key)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(s.CARootPEM)
	st, err := storage.Dir(s.Dir)
	if err != nil {
		t.Fatal(err)
	}
	resolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, s.DNSAddr)
	}}
	opts := []Opt{WithForgeDomain(s.Domain), WithRegistrationEndpoint(s.BrokerURL), WithCA(s.CAURL, roots),
		WithAllowPrivateAddrs(), WithResolver(resolver), WithStorage(crashingStorage{st, s.CrashOn})}
	if !s.Now.IsZero() {
		opts = append(opts, withClock(newFakeClock(s.Now)))
	}
	h, err := libp2p.New(
		libp2p.Identity(key),
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"),
		libp2p.ConnectionGater(testforge.LoopbackGater()),
		Option(opts...),
	)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	time.Sleep(time.Minute) // the crash comes first
	t.Fatal("no crash")
}

// TestFaultCrashRestart: a process is killed between the CA issuing its
// certificate and storing it (a real crash: a child process exits inside
// the storage write, leaving its lock file behind). On restart with the
// same identity and storage, the host gets the certificate the CA issued
// before the crash: the pending order (its key, its order and the chain,
// store.go) completes the write, so there is no new account, order,
// registration, validation or finalization, and so no second certificate
// counting against the CA's limit on the name. The pending order is
// deleted once the certificate is stored. The lock the child died holding
// is free at once for the restarted host's next issuance, its file still
// in place.
func TestFaultCrashRestart(t *testing.T) {
	f := startForge(t, testforge.Config{AuthzReusePercent: 100})
	ca := startCAProxy(t, f)
	key := genKey(t, crypto.Ed25519)
	rawKey, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "store")
	runCrashChild(t, crashSetup{Domain: f.Domain, BrokerURL: f.BrokerURL, CAURL: ca.URL, DNSAddr: f.DNSAddr, Dir: dir, CARootPEM: ca.RootPEM, Key: rawKey})
	id := idOf(t, key)
	s := filesFor(dir, f, ca.URL, id)
	if _, err := os.Stat(s.cert); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a certificate was stored before the crash: %v", err)
	}
	if pending, _ := filepath.Glob(pendingGlob(dir)); len(pending) != 1 {
		t.Fatalf("the crash left %d pending orders, want 1", len(pending))
	}
	crashed := ca.Requests()
	if count(crashed, http.MethodPost, "/certZ/") != 1 {
		t.Fatalf("the child did not download its certificate before crashing")
	}
	lock := filepath.Join(dir, "locks", certmagic.StorageKeys.Safe("issue_cert_"+certName(id, f.Domain))+".lock")
	if _, err := os.Stat(lock); err != nil {
		t.Fatalf("the crash left no lock file: %v", err)
	}
	// The lock file stays, but the lock died with its holder: the restart
	// takes it at once (storage.Dir locks with flock).
	childLock := mustRead(t, lock)

	leaks := leakCheck(t)
	before := f.Stats()
	st, err := storage.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	probe := &lockProbe{Storage: st, file: lock}
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute))
	r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(probe), WithCA(ca.URL, ca.Roots))
	r.closers = append(r.closers, ca.Close)
	served := r.waitLoaded(t)
	after := ca.Requests()[len(crashed):]
	got := map[string]int{
		"new accounts":  count(after, http.MethodPost, "/sign-me-up"),
		"new orders":    count(after, http.MethodPost, "/order-plz"),
		"validations":   count(after, http.MethodPost, "/chalZ/"),
		"finalizations": count(after, http.MethodPost, "/finalize-order/"),
		"registrations": f.Stats().Registered - before.Registered,
	}
	if count(crashed, http.MethodPost, "/finalize-order/") != 1 {
		t.Fatalf("the child's finalization is not where the test looks for it")
	}
	want := map[string]int{"new accounts": 0, "new orders": 0, "validations": 0, "finalizations": 0, "registrations": 0}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("restart: %d %s, want %d", got[k], k, w)
		}
	}
	t.Logf("restart after the crash: %v, %d CA requests", got, len(after))
	pending, err := filepath.Glob(pendingGlob(dir))
	if err != nil || len(pending) != 0 {
		t.Errorf("the pending order outlived the stored certificate: %v %v", pending, err)
	}

	// The next issuance takes the lock that the child died holding, with
	// its file still there: at once, with no failed attempt.
	r.kick(t)
	r.waitRenewed(t, served)
	switch seen := probe.calls(); {
	case len(seen) != 1:
		t.Errorf("the lock was asked for %d times, want once", len(seen))
	case !bytes.Equal(seen[0].content, childLock):
		t.Errorf("the lock file held %q when the lock was taken, not the crashed child's %q", seen[0].content, childLock)
	case !seen[0].atOnce:
		t.Error("the lock the crashed child held was not free at once")
	}
	if w := r.retries(); len(w) != 0 {
		t.Errorf("failed attempts after the restart, retried after %v:\n%s", w, r.logs)
	}
	if w := warnings(r); len(w) != 0 {
		t.Errorf("warnings after the restart:\n%s", r.logs)
	}
	pingOverTCP(t, f, r.h)
	r.closeAndCheck(t, leaks)
}

// TestFaultCrashRenewal: a process is killed while it stores a renewed
// certificate, before the new key was written or after it and before the
// certificate (a real crash: a child process that started from a valid
// stored certificate, renewed it at once on a clock past its renewal time,
// and exits inside the Store of the .key or the .crt file). Storage then
// holds the old pair, or the new key beside the old certificate, and the
// new chain in the pending order. On restart with the same identity and
// storage, on the real clock, the host serves at once, from storage, the
// NEW certificate, the one the child downloaded (its chain is in the
// pending order); storage holds a consistent pair again; the pending order
// is gone; and the restart costs no request to the CA, the broker or DNS,
// and no warning.
func TestFaultCrashRenewal(t *testing.T) {
	// Before the new key is written (the old pair intact, the new one in
	// the pending order), and between the key and the certificate (a torn
	// pair).
	for _, crashOn := range []string{".key", ".crt"} {
		t.Run("crash storing "+crashOn, func(t *testing.T) { crashRenewal(t, crashOn) })
	}
}

func crashRenewal(t *testing.T, crashOn string) {
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	key := genKey(t, crypto.Ed25519)
	rawKey, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	id := idOf(t, key)
	name := certName(id, f.Domain)
	dir := filepath.Join(t.TempDir(), "store")
	s := filesFor(dir, f, ca.URL, id)

	// The certificate the child renews, issued through the same CA.
	st, err := storage.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	first := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, WithStorage(st), WithCA(ca.URL, ca.Roots))
	waitCert(t, first, 30*time.Second)
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	oldCert, oldKey := mustRead(t, s.cert), mustRead(t, s.key)
	old, err := checkCert(oldCert, oldKey, name, time.Now())
	if err != nil {
		t.Fatal(err)
	}

	runCrashChild(t, crashSetup{Domain: f.Domain, BrokerURL: f.BrokerURL, CAURL: ca.URL, DNSAddr: f.DNSAddr, Dir: dir,
		CARootPEM: ca.RootPEM, Key: rawKey, Now: renewAt(old.leaf).Add(time.Minute), CrashOn: crashOn})
	// The crash came where it should: the old certificate in place, and
	// beside it the old key (crash on .key) or the new one (crash on .crt).
	if !bytes.Equal(mustRead(t, s.cert), oldCert) {
		t.Fatal("the child stored its certificate before crashing")
	}
	if newKey := !bytes.Equal(mustRead(t, s.key), oldKey); newKey != (crashOn == ".crt") {
		t.Fatalf("after a crash storing %s, the new key stored: %v", crashOn, newKey)
	}
	pending, err := filepath.Glob(pendingGlob(dir))
	if err != nil || len(pending) != 1 {
		t.Fatalf("the crash left pending orders %v (%v), want 1", pending, err)
	}
	var po pendingOrder
	if err := json.Unmarshal(mustRead(t, pending[0]), &po); err != nil {
		t.Fatal(err)
	}
	downloaded, err := checkCert([]byte(po.Chain), []byte(po.KeyPEM), name, time.Now())
	if err != nil {
		t.Fatalf("the pending order holds no usable chain: %v", err)
	}
	if downloaded.leaf.Equal(old.leaf) {
		t.Fatal("the child downloaded the certificate it was renewing")
	}

	// The restart, on the real clock.
	leaks := leakCheck(t)
	before, caBefore := f.Stats(), len(ca.Requests())
	logs := &logCapture{}
	st, err = storage.Dir(dir, storage.WithLogger(logs.logger()))
	if err != nil {
		t.Fatal(err)
	}
	var m *manager
	h := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, WithStorage(st), WithCA(ca.URL, ca.Roots),
		WithLogger(logs.logger()), withManager(func(x *manager) { m = x }))
	// Served before the host's start returned.
	c := m.cert.Load()
	if c == nil || len(browserAddrs(h, f.Domain)) == 0 {
		t.Fatalf("no certificate served, or no browser address, once the host started:\n%s", logs)
	}
	if ev := waitCert(t, h, 5*time.Second); ev.Source != FromStorage {
		t.Errorf("certificate event %+v, want Source %q", ev, FromStorage)
	}
	if c.leaf.SerialNumber.Cmp(downloaded.leaf.SerialNumber) != 0 {
		t.Fatalf("serving serial %v, want the renewed %v (the old one is %v)", c.leaf.SerialNumber, downloaded.leaf.SerialNumber, old.leaf.SerialNumber)
	}
	r := &faultRig{f: f, h: h, m: m, logs: logs}
	if got := servedSerial(t, r); got != c.leaf.SerialNumber.String() {
		t.Errorf("the WSS listener serves serial %q, want %v", got, c.leaf.SerialNumber)
	}
	stored, err := checkCert(mustRead(t, s.cert), mustRead(t, s.key), name, time.Now())
	if err != nil {
		t.Fatalf("storage does not hold a consistent pair after the restart: %v", err)
	}
	if !stored.leaf.Equal(downloaded.leaf) {
		t.Errorf("storage holds serial %v, want the renewed %v", stored.leaf.SerialNumber, downloaded.leaf.SerialNumber)
	}
	if pending, err := filepath.Glob(pendingGlob(dir)); err != nil || len(pending) != 0 {
		t.Errorf("the pending order outlived the stored certificate: %v %v", pending, err)
	}
	pingOverTCP(t, f, h)
	r.close(t)

	// Counted once the host is closed: nothing it did is left out.
	after := f.Stats()
	got := map[string]int{
		"CA (through the proxy)": len(ca.Requests()) - caBefore,
		"CA (at Pebble)":         after.CA - before.CA,
		"broker health":          after.Health - before.Health,
		"broker challenge":       after.Challenge - before.Challenge,
		"DNS":                    after.DNS - before.DNS,
	}
	for k, n := range got {
		if n != 0 {
			t.Errorf("restart: %d %s requests, want 0", n, k)
		}
	}
	if w := logs.atLeast(slog.LevelWarn); len(w) != 0 {
		t.Errorf("warnings at the restart:\n%s", logs)
	}
	if !strings.Contains(logs.String(), "completed storing a certificate that an earlier run obtained") {
		t.Errorf("the log does not say the write was completed:\n%s", logs)
	}
	ca.Close()
	leaks()
}
