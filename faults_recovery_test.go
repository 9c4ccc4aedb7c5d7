package autotls

// Fault tests of recovery: a damaged lock file in the way of the first
// issuance, and a certificate that lapsed while the CA was down.

import (
	"crypto/x509"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestFaultLockDamaged: the lock file of the certificate, left damaged
// before the host starts, never keeps the host from its certificate. A
// torn write, a date in the future and an empty directory are repaired by
// storage.Dir's Lock with one warning naming the file, and the host gets
// its certificate with no failed attempt and no wait on its clock beyond
// an issuance's own polls (a lock that waited for the date, or a garbage
// file judged held, would time out into a failed attempt). A directory
// with something in it is not the store's to remove: the attempt fails at
// once with a storage failure that names it and says to remove it, and
// the next retry after the operator removed it issues.
func TestFaultLockDamaged(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name string
		// damage replaces the lock file at path.
		damage func(t *testing.T, path string)
		// stuck: the first attempt fails until the test removes path.
		stuck bool
		want  string // in the one warning
	}{
		{
			name: "torn write",
			damage: func(t *testing.T, path string) {
				mustWrite(t, path, []byte(`{"created":"2026-`))
			},
			want: "lock file held garbage",
		},
		{
			name: "dated tomorrow",
			damage: func(t *testing.T, path string) {
				tomorrow := time.Now().Add(24 * time.Hour).Format(time.RFC3339Nano)
				mustWrite(t, path, []byte(`{"created":"`+tomorrow+`","updated":"`+tomorrow+`"}`))
			},
			want: "lock file was dated in the future",
		},
		{
			name: "empty directory",
			damage: func(t *testing.T, path string) {
				if err := os.Mkdir(path, 0o700); err != nil {
					t.Fatal(err)
				}
			},
			want: "lock file was an empty directory",
		},
		{
			name: "directory not empty",
			damage: func(t *testing.T, path string) {
				if err := os.Mkdir(path, 0o700); err != nil {
					t.Fatal(err)
				}
				mustWrite(t, filepath.Join(path, "notes"), []byte("someone's"))
			},
			stuck: true,
			want:  "remove it",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			key := genKey(t, crypto.Ed25519)
			dir := filepath.Join(t.TempDir(), "store")
			lock := writeLock(t, dir, f, idOf(t, key), time.Now())
			if err := os.Remove(lock); err != nil {
				t.Fatal(err)
			}
			tc.damage(t, lock)

			// The store's own warnings, apart from the manager's.
			storeLogs := &logCapture{}
			st, err := storage.Dir(dir, storage.WithLogger(storeLogs.logger()))
			if err != nil {
				t.Fatal(err)
			}
			clk := newClockAtNow()
			if tc.stuck {
				clk.SetHorizon(clk.Now()) // park at the first retry
			} else {
				clk.SetHorizon(clk.Now().Add(time.Minute))
			}
			r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st))

			if tc.stuck {
				clk.WaitParked(t, 30*time.Second)
				if r.m.cert.Load() != nil {
					t.Fatal("a certificate was issued without the lock")
				}
				ev := r.fails.last(t)
				var se *storageError
				if !errors.As(ev.Err, &se) {
					t.Errorf("the failure %v is not a storage failure", ev.Err)
				}
				w := warnings(r)
				if len(w) != 1 || !strings.Contains(w[0].text, lock) || !strings.Contains(w[0].text, tc.want) {
					t.Fatalf("want one warning naming %s and saying to %q:\n%s", lock, tc.want, r.logs)
				}
				t.Logf("the operator reads: %s", w[0].text)
				pingOverTCP(t, f, r.h)
				if err := os.RemoveAll(lock); err != nil {
					t.Fatal(err)
				}
				clk.SetHorizon(clk.Now().Add(time.Minute))
			}
			c := r.waitLoaded(t)
			if _, err := os.Stat(lock); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the lock file is still there after issuance: %v", err)
			}

			fails := r.fails.all()
			if tc.stuck {
				if len(fails) != 1 {
					t.Errorf("%d failed attempts, want 1: the retry after the fix must issue", len(fails))
				}
				checkBackoff(t, r.retries())
				if w := warnings(r); len(w) != 1 {
					t.Errorf("%d warnings from the host, want the 1 about the lock:\n%s", len(w), r.logs)
				}
				if w := storeLogs.atLeast(slog.LevelWarn); len(w) != 0 {
					t.Errorf("storage warnings for a lock it must not repair:\n%s", storeLogs)
				}
			} else {
				if len(fails) != 0 || len(r.retries()) != 0 {
					t.Errorf("failed attempts %v, retries %v: the damaged lock was not repaired at once", fails, r.retries())
				}
				// The only long wait is the one the clock is parked in,
				// until the first ARI poll; every other is a poll inside
				// the issuance.
				clk.WaitParked(t, 30*time.Second)
				waits := clk.Waits()
				for i, d := range waits[:len(waits)-1] {
					if d > pollMax {
						t.Errorf("wait %d of %v before the certificate is %v, longer than any poll of an issuance", i+1, waits, d)
					}
				}
				if w := warnings(r); len(w) != 0 {
					t.Errorf("warnings from the host for a lock the store repaired:\n%s", r.logs)
				}
				w := storeLogs.atLeast(slog.LevelWarn)
				if len(w) != 1 || !strings.Contains(w[0].text, lock) || !strings.Contains(w[0].text, tc.want) {
					t.Fatalf("want one storage warning naming %s (%q):\n%s", lock, tc.want, storeLogs)
				}
				t.Logf("the operator reads: %s", w[0].text)
			}
			if servedSerial(t, r) != c.leaf.SerialNumber.String() {
				t.Error("the WSS listener does not serve the certificate")
			}
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
	}
}

// TestFaultLapse: the CA is down (every request answered 503) from before
// the renewal is due until after the certificate expired. The renewal
// attempts fail meanwhile, the certificate lapses, and the attempts go on
// on the transient backoff, each wait within the bounds of its attempt
// number. When the CA is back, the very next attempt, at the end of the
// wait already running, issues a new certificate: no failure after the
// CA's return, and its order names no certificate it "replaces" (the
// lapsed one is no longer current, and a CA refuses to replace it).
//
// Pebble dates certificates by the real clock, and the host's clock is a
// day ahead by the end: a certificate from the CA that issued the lapsed
// one would be born expired. So the lapsed one, valid for a day, comes
// from a second forge, stored before the host starts (as in
// TestFaultExpiry), and the CA the host uses issues for 90 days. Its
// account there is new, with no valid authorization: the new certificate
// needs the broker.
func TestFaultLapse(t *testing.T) {
	const validity = 24 * time.Hour
	short := startForge(t, testforge.Config{CertValidity: validity})
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	key := genKey(t, crypto.Ed25519)
	st := storage.Memory()
	served := storeIssued(t, short, idOf(t, key), st, issuerKey(ca.URL))
	notAfter := served.NotAfter
	ca.SetFault(func(w http.ResponseWriter, _ *http.Request) bool {
		http.Error(w, "the CA is down", http.StatusServiceUnavailable)
		return true
	})

	clk := newClockAtNow()
	// Past the end of the wait running at expiry: an attempt or more
	// after the lapse, still with the CA down.
	clk.SetHorizon(notAfter.Add(retryCap))
	// No ARI poll before the certificate lapses: acmez retries a failed
	// one twice after 2 s and 5 s of real time, whatever our clock, which
	// would cost this test a minute for nothing it looks at.
	noARI := func(m *manager) { m.ariFirstPoll = 4 * validity }
	r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, noARI, WithStorage(st), WithCA(ca.URL, ca.Roots))
	r.closers = append(r.closers, ca.Close)
	expired, err := r.h.EventBus().Subscribe(new(EvtCertificateExpired))
	if err != nil {
		t.Fatal(err)
	}
	defer expired.Close()
	select {
	case <-expired.Out():
	case <-time.After(30 * time.Second):
		t.Fatalf("no EvtCertificateExpired; log:\n%s", r.logs)
	}
	clk.WaitParked(t, 30*time.Second)
	if r.m.cert.Load() != nil {
		t.Fatal("the certificate is still served after it expired")
	}
	// From the log, written before the manager waits (a failure event
	// may still be on its way to r.fails).
	var renewals, lapsed int
	for _, l := range r.logs.all() {
		if _, failed := l.attrs["retry_in"]; !failed {
			continue
		}
		if l.attrs["renewal"].Bool() {
			renewals++
		} else {
			lapsed++
		}
	}
	down := r.retries()
	if renewals < 2 || lapsed < 1 {
		t.Fatalf("%d failed renewals before the expiry and %d failed attempts after it; want some of each", renewals, lapsed)
	}

	// The CA is back while the manager waits for its next attempt.
	back := clk.Now()
	before := len(ca.Requests())
	registered := f.Stats().Registered
	ca.SetFault(nil)
	clk.SetHorizon(back.Add(retryCap))
	c := r.waitLoaded(t)
	if c.leaf.SerialNumber.Cmp(served.SerialNumber) == 0 || !c.leaf.NotAfter.After(clk.Now()) {
		t.Fatalf("served %v (not after %v) after the lapse, want a new valid certificate", c.leaf.SerialNumber, c.leaf.NotAfter)
	}
	waits := r.retries()
	if len(waits) != len(down) {
		t.Errorf("%d failed attempts after the CA came back, want 0:\n%s", len(waits)-len(down), r.logs)
	}
	// Every wait, the one before the successful attempt included, is
	// the transient backoff of its attempt number.
	checkBackoff(t, waits)
	// The attempt begins as that wait ends; its own polls take seconds.
	if took, last := clk.Now().Sub(back), waits[len(waits)-1]; took > last+time.Minute {
		t.Errorf("the certificate came %v after the CA's return, more than a minute after the wait of %v then running", took, last)
	}
	var orders []string
	for _, q := range ca.Requests()[before:] {
		if q.Method == http.MethodPost && q.Path == "/order-plz" {
			orders = append(orders, orderReplaces(t, q.Body))
		}
	}
	if len(orders) != 1 || orders[0] != "" {
		t.Errorf("orders after the CA came back name as replaced %q; want one order naming none", orders)
	}
	if n := f.Stats().Registered - registered; n != 1 {
		t.Errorf("%d registrations with the broker for the new certificate, want 1", n)
	}
	// One for the outage, one for the lapse; the repeats at debug level.
	if w := warnings(r); len(w) != 2 {
		t.Errorf("%d warnings, want 2 (the CA unreachable, the certificate expired):\n%s", len(w), r.logs)
	}
	t.Logf("%d failed attempts over %v of outage (%d as renewals); the last wait %v; the operator read:\n%s",
		len(down), back.Sub(renewAt(served)).Round(time.Minute), renewals, waits[len(waits)-1].Round(time.Second), warningText(r))
	if servedSerial(t, r) != c.leaf.SerialNumber.String() {
		t.Error("the WSS listener does not serve the new certificate")
	}
	pingOverTCP(t, f, r.h)
	r.closeAndCheck(t, leaks)
}

// warningText returns the rig's warnings, one a line.
func warningText(r *faultRig) string {
	var b strings.Builder
	for _, l := range warnings(r) {
		b.WriteString(l.text)
	}
	return b.String()
}

// storeIssued has f issue a certificate for id directly and stores it,
// with its key, where a host using the CA of issuer key ik looks for it.
// It returns the leaf.
func storeIssued(t *testing.T, f *testforge.Forge, id peer.ID, st certmagic.Storage, ik string) *x509.Certificate {
	t.Helper()
	certKey := ecdsaKey(t)
	chains, err := f.IssueDirect(t.Context(), id, certKey)
	if err != nil {
		t.Fatal(err)
	}
	name := certName(id, f.Domain)
	for k, v := range map[string][]byte{
		certmagic.StorageKeys.SiteCert(ik, name):       chains[0].ChainPEM,
		certmagic.StorageKeys.SitePrivateKey(ik, name): pemKey(t, certKey),
		certmagic.StorageKeys.SiteMeta(ik, name):       []byte(`{"sans":["` + name + `"],"issuer_data":{}}`),
	} {
		if err := st.Store(t.Context(), k, v); err != nil {
			t.Fatal(err)
		}
	}
	c, err := checkCert(chains[0].ChainPEM, pemKey(t, certKey), name, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return c.leaf
}
