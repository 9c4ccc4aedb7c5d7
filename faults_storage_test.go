package autotls

// Fault tests of storage: damaged, unreadable and unwritable storage,
// locks left behind, and a certificate expiring without renewal.

import (
	"bytes"
	"crypto/tls"
	"fmt"
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

// storedFiles names the on-disk files of a host's certificate.
type storedFiles struct {
	dir             string
	cert, key, meta string // paths
}

func filesFor(dir string, f *testforge.Forge, caURL string, id peer.ID) storedFiles {
	fs := &certmagic.FileStorage{Path: dir}
	ik, name := issuerKey(caURL), certName(id, f.Domain)
	return storedFiles{
		dir:  dir,
		cert: fs.Filename(certmagic.StorageKeys.SiteCert(ik, name)),
		key:  fs.Filename(certmagic.StorageKeys.SitePrivateKey(ik, name)),
		meta: fs.Filename(certmagic.StorageKeys.SiteMeta(ik, name)),
	}
}

// issueToDir runs a host with identity key until it has a certificate in
// an on-disk store at dir, and closes it.
func issueToDir(t *testing.T, f *testforge.Forge, key crypto.PrivKey, dir string) EvtCertificateLoaded {
	t.Helper()
	st, err := storage.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	h := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, WithStorage(st))
	ev := waitCert(t, h, 30*time.Second)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	return ev
}
func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
func mustWrite(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestFaultStorage: what a disk does to the stored certificate. In every
// case the error is named, a wrong certificate is never served, a valid
// one is never deleted (an unreadable one is waited for, not replaced:
// issuing again would spend the CA's five-per-week limit on a name), and
// the manager recovers by itself once the storage is fixed.
func TestFaultStorage(t *testing.T) {
	f := startForge(t, testforge.Config{})
	other := genKey(t, crypto.Ed25519)
	otherKey := ecdsaKey(t)
	otherCert, err := f.IssueDirect(t.Context(), idOf(t, other), otherKey)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		// spoil damages the stored certificate; fix repairs it, if the
		// fix is the operator's (nil: the manager replaces it itself).
		spoil, fix func(t *testing.T, s storedFiles, good map[string][]byte)
		// replaced: the damaged certificate is replaced by a new one
		// (else the good one is served again once fixed).
		replaced bool
		want     string // in the warning
	}{
		{
			name: "unreadable",
			spoil: func(t *testing.T, s storedFiles, _ map[string][]byte) {
				// A directory where the file was: a read error even for
				// root, to whom permission bits do not apply.
				if err := os.Remove(s.cert); err != nil {
					t.Fatal(err)
				}
				if err := os.Mkdir(s.cert, 0o700); err != nil {
					t.Fatal(err)
				}
			},
			fix: func(t *testing.T, s storedFiles, good map[string][]byte) {
				if err := os.Remove(s.cert); err != nil {
					t.Fatal(err)
				}
				mustWrite(t, s.cert, good["cert"])
			},
			want: "is a directory",
		},
		{
			name: "corrupt PEM",
			spoil: func(t *testing.T, s storedFiles, good map[string][]byte) {
				b := bytes.Clone(good["cert"])
				copy(b[len(b)/2:], "\x00\x00garbage\x00\x00")
				mustWrite(t, s.cert, b)
			},
			replaced: true,
			want:     "certificate chain: ",
		},
		{
			// A torn write: the leaf whole, the file ending halfway
			// through the intermediate, the key intact. pem.Decode
			// alone skips the broken block and finds a lone leaf.
			name: "truncated chain",
			spoil: func(t *testing.T, s storedFiles, good map[string][]byte) {
				b := good["cert"]
				begin := []byte("-----BEGIN CERTIFICATE-----")
				i := bytes.Index(b[len(begin):], begin) + len(begin)
				if i < len(begin) {
					t.Fatal("the stored chain has no intermediate")
				}
				end := bytes.Index(b[i:], []byte("-----END CERTIFICATE-----")) + i
				mustWrite(t, s.cert, b[:i+(end-i)/2])
			},
			replaced: true,
			want:     "certificate chain: block 2 of 2 is truncated",
		},
		{
			name: "certificate for another name",
			spoil: func(t *testing.T, s storedFiles, _ map[string][]byte) {
				// A valid pair from the same CA, for another peer's name.
				mustWrite(t, s.cert, otherCert[0].ChainPEM)
				mustWrite(t, s.key, pemKey(t, otherKey))
			},
			replaced: true,
			want:     "certificate is for ",
		},
		{
			name: "key not matching the certificate",
			spoil: func(t *testing.T, s storedFiles, _ map[string][]byte) {
				mustWrite(t, s.key, pemKey(t, ecdsaKey(t)))
			},
			replaced: true,
			want:     "private key does not match",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := genKey(t, crypto.Ed25519)
			dir := filepath.Join(t.TempDir(), "store")
			issueToDir(t, f, key, dir)
			s := filesFor(dir, f, f.CAURL, idOf(t, key))
			good := map[string][]byte{"cert": mustRead(t, s.cert), "key": mustRead(t, s.key)}
			tc.spoil(t, s, good)
			goodPair, err := tls.X509KeyPair(good["cert"], good["key"])
			if err != nil {
				t.Fatal(err)
			}
			firstSerial := goodPair.Leaf.SerialNumber

			leaks := leakCheck(t)
			before := f.Stats()
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(10 * time.Minute))
			st, err := storage.Dir(dir)
			if err != nil {
				t.Fatal(err)
			}
			r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st))
			loaded, err := r.h.EventBus().Subscribe(new(EvtCertificateLoaded))
			if err != nil {
				t.Fatal(err)
			}
			defer loaded.Close()

			if tc.replaced {
				c := r.waitLoaded(t)
				if c.leaf.SerialNumber.Cmp(firstSerial) == 0 {
					t.Fatal("the damaged certificate was served")
				}
				// One, or none if the CA reused the authorization it
				// validated for the damaged certificate.
				if got := f.Stats().Registered - before.Registered; got > 1 {
					t.Errorf("%d registrations to replace it, want 1", got)
				}
				// Moved aside for the operator, not deleted.
				if _, err := os.Stat(s.cert + asideSuffix); err != nil {
					t.Errorf("the damaged certificate was not kept aside: %v", err)
				}
			} else {
				clk.WaitParked(t, 30*time.Second)
				if r.m.cert.Load() != nil {
					t.Fatal("a certificate is served from unreadable storage")
				}
				if d := f.Stats().CA - before.CA; d != 0 {
					t.Errorf("%d CA requests: an unreadable certificate must not be replaced by a new order", d)
				}
				pingOverTCP(t, f, r.h)
				tc.fix(t, s, good)
				clk.SetHorizon(clk.Now().Add(retryCap))
				c := r.waitLoaded(t)
				if c.leaf.SerialNumber.Cmp(firstSerial) != 0 {
					t.Errorf("after the fix another certificate is served (serial %v, want %v)", c.leaf.SerialNumber, firstSerial)
				}
			}
			// Whatever is served is ours, valid, with its key.
			c := r.m.cert.Load()
			if _, err := checkCert(mustRead(t, s.cert), mustRead(t, s.key), r.m.name, r.clk.Now()); err != nil {
				t.Errorf("storage does not hold a usable certificate after recovery: %v", err)
			}
			if servedSerial(t, r) != c.leaf.SerialNumber.String() {
				t.Error("the WSS listener does not serve the loaded certificate")
			}
			for _, ev := range drain(loaded.Out()) {
				if e := ev.(EvtCertificateLoaded); e.Source == FromStorage && tc.replaced {
					t.Errorf("the damaged certificate was loaded from storage: %+v", e)
				}
			}
			w := warnings(r)
			if len(w) == 0 || !strings.Contains(w[0].text, tc.want) {
				t.Fatalf("warnings do not name the cause (%q):\n%s", tc.want, r.logs)
			}
			if tc.replaced && len(w) != 1 {
				t.Errorf("%d warnings, want 1 (moved aside):\n%s", len(w), r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
	}
}

// breakDir makes dir unwritable with a real file-system error: read-only
// permissions, or, for root (to whom permission bits do not apply), a
// regular file where the directory was. It returns the repair.
func breakDir(t *testing.T, dir string) (fix func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		if err := os.Chmod(dir, 0o500); err != nil {
			t.Fatal(err)
		}
		return func() {
			if err := os.Chmod(dir, 0o700); err != nil {
				t.Fatal(err)
			}
		}
	}
	return replaceDirWithFile(t, dir)
}

// TestFaultStorageUnwritable: with a storage directory that cannot be
// written, the first issuance stops before it costs the CA anything (no
// order whose certificate could not be kept), says why, backs off, and
// succeeds once the directory is fixed; at renewal, the certificate in
// use stays in use.
func TestFaultStorageUnwritable(t *testing.T) {
	f := startForge(t, testforge.Config{})
	t.Run("first issuance", func(t *testing.T) {
		leaks := leakCheck(t)
		dir := filepath.Join(t.TempDir(), "store")
		st, err := storage.Dir(dir)
		if err != nil {
			t.Fatal(err)
		}
		fix := breakDir(t, dir)
		before := f.Stats()
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(30 * time.Minute))
		r := startRig(t, f, clk, nil, nil, WithStorage(st))
		clk.WaitParked(t, 30*time.Second)
		checkBackoff(t, r.retries())
		if d := f.Stats().CA - before.CA; d != 0 {
			t.Errorf("%d CA requests while the certificate could not be stored", d)
		}
		w := warnings(r)
		if len(w) == 0 || !strings.Contains(w[len(w)-1].text, "storage") {
			t.Fatalf("no warning names the storage:\n%s", r.logs)
		}
		t.Logf("the operator reads: %s", w[len(w)-1].text)
		pingOverTCP(t, f, r.h)

		fix()
		clk.SetHorizon(clk.Now().Add(retryCap))
		r.waitLoaded(t)
		r.closeAndCheck(t, leaks)
	})
	t.Run("renewal", func(t *testing.T) {
		leaks := leakCheck(t)
		r, dir, served := startDirRig(t, f)
		fix := breakDir(t, dir)
		r.kick(t) // renew now
		if ev := r.fails.last(t); !ev.Renewal {
			t.Errorf("failure %+v is not a renewal's", ev)
		}
		if c := r.m.cert.Load(); c != served {
			t.Fatal("the certificate in use was dropped when its renewal could not be stored")
		}
		if servedSerial(t, r) != served.leaf.SerialNumber.String() {
			t.Fatal("the WSS listener no longer serves the certificate in use")
		}
		pingOverTCP(t, f, r.h)
		fix()
		r.kick(t)
		r.waitRenewed(t, served)
		r.closeAndCheck(t, leaks)
	})
}

// TestFaultStorageCorruptAtRenewal: the stored copy of the certificate in
// use is damaged while the host runs. The certificate in use stays in use
// until the renewal, which is not stopped by the damaged copy (moved aside
// when the renewal looks at storage under the lock) and overwrites it.
func TestFaultStorageCorruptAtRenewal(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	r, dir, served := startDirRig(t, f)
	s := filesFor(dir, f, f.CAURL, r.h.ID())
	mustWrite(t, s.cert, []byte("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"))

	r.kick(t) // renewal due
	r.waitRenewed(t, served)
	if _, err := checkCert(mustRead(t, s.cert), mustRead(t, s.key), r.m.name, r.clk.Now()); err != nil {
		t.Errorf("storage does not hold the renewed certificate: %v", err)
	}
	pingOverTCP(t, f, r.h)
	r.closeAndCheck(t, leaks)
}

// writeLock leaves the lock file certmagic's FileStorage would hold while
// issuing for id, last refreshed at updated, as a process that died
// holding it does.
func writeLock(t *testing.T, dir string, f *testforge.Forge, id peer.ID, updated time.Time) string {
	t.Helper()
	name := certmagic.StorageKeys.Safe("issue_cert_"+certName(id, f.Domain)) + ".lock"
	path := filepath.Join(dir, "locks", name)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, path, fmt.Appendf(nil, `{"created":%q,"updated":%q}`, updated.Add(-time.Minute).Format(time.RFC3339Nano), updated.Format(time.RFC3339Nano)))
	return path
}

// certmagic's FileStorage considers a lock stale once it has not been
// refreshed for twice its 5 s refresh interval.
const lockStaleAfter = 10 * time.Second

// TestFaultStaleLock: a lock file in certmagic's own format, as an earlier
// release holds it while issuing (it refreshes the file every 5 s), does
// not block issuance for ever: storage.Dir judges it as certmagic does,
// stale 10 s after its last refresh, and takes it over. A lock long dead is
// taken at once; one that was alive a moment ago is waited for (not broken
// early), then taken.
func TestFaultStaleLock(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name string
		age  time.Duration
	}{
		{"long dead", time.Hour},
		{"just died", lockStaleAfter - 2*time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			key := genKey(t, crypto.Ed25519)
			dir := filepath.Join(t.TempDir(), "store")
			st, err := storage.Dir(dir)
			if err != nil {
				t.Fatal(err)
			}
			updated := time.Now().Add(-tc.age)
			lock := writeLock(t, dir, f, idOf(t, key), updated)
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(time.Minute))
			r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st))
			r.waitLoaded(t)
			// A lower bound, not a speed: the lock was not broken while
			// its owner could still have been alive.
			if now := time.Now(); now.Before(updated.Add(lockStaleAfter)) {
				t.Errorf("issued %v before the lock became stale", updated.Add(lockStaleAfter).Sub(now))
			}
			if _, err := os.Stat(lock); err == nil {
				// The file is ours again only if certmagic re-created it;
				// it is removed when issuance ends.
				t.Errorf("the lock file is still there after issuance")
			}
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
	}
}

// TestFaultExpiry: a certificate found expired at start is deleted, never
// served, and replaced by a fresh issuance; a certificate whose renewal
// keeps failing stays in use until its last second, and then its WSS
// listeners close, its browser addresses are withdrawn, and
// EvtCertificateExpired is emitted, while the host's other transports go on.
func TestFaultExpiry(t *testing.T) {
	t.Run("expired at start", func(t *testing.T) {
		// The expired certificate comes from a forge issuing for an hour;
		// the host, two hours later by its clock, uses a forge issuing for
		// 90 days.
		old := startForge(t, testforge.Config{CertValidity: time.Hour})
		f := startForge(t, testforge.Config{})
		leaks := leakCheck(t)
		key := genKey(t, crypto.Ed25519)
		id := idOf(t, key)
		certKey := ecdsaKey(t)
		chains, err := old.IssueDirect(t.Context(), id, certKey)
		if err != nil {
			t.Fatal(err)
		}
		st := storage.Memory()
		ik, name := issuerKey(f.CAURL), certName(id, f.Domain)
		for k, v := range map[string][]byte{
			certmagic.StorageKeys.SiteCert(ik, name):       chains[0].ChainPEM,
			certmagic.StorageKeys.SitePrivateKey(ik, name): pemKey(t, certKey),
			certmagic.StorageKeys.SiteMeta(ik, name):       []byte(`{"sans":["` + name + `"],"issuer_data":{}}`),
		} {
			if err := st.Store(t.Context(), k, v); err != nil {
				t.Fatal(err)
			}
		}
		clk := newFakeClock(time.Now().Add(2 * time.Hour).Truncate(time.Second))
		clk.SetHorizon(clk.Now().Add(time.Minute))
		r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st))
		loaded, err := r.h.EventBus().Subscribe(new(EvtCertificateLoaded))
		if err != nil {
			t.Fatal(err)
		}
		defer loaded.Close()
		c := r.waitLoaded(t)
		if !c.leaf.NotAfter.After(clk.Now()) {
			t.Fatalf("serving a certificate that expired at %v", c.leaf.NotAfter)
		}
		for _, e := range drain(loaded.Out()) {
			if ev := e.(EvtCertificateLoaded); ev.Source != Obtained {
				t.Errorf("certificate event %+v, want only a fresh issuance", ev)
			}
		}
		if !strings.Contains(r.logs.String(), "stored certificate expired; deleting it") {
			t.Errorf("the log does not say the stored certificate expired:\n%s", r.logs)
		}
		if len(warnings(r)) != 0 {
			t.Errorf("warnings for an expected expiry:\n%s", r.logs)
		}
		r.closeAndCheck(t, leaks)
	})

	t.Run("renewal failing until expiry", func(t *testing.T) {
		f := startForge(t, testforge.Config{CertValidity: 24 * time.Hour})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		r := startProxiedRig(t, f, ca)
		clk := r.clk
		served := r.waitLoaded(t)
		clk.WaitParked(t, 30*time.Second)
		forgetValidAuthz(t, r, ca)
		notAfter := served.leaf.NotAfter
		expired, err := r.h.EventBus().Subscribe(new(EvtCertificateExpired))
		if err != nil {
			t.Fatal(err)
		}
		defer expired.Close()

		f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
			http.Error(w, "maintenance", http.StatusServiceUnavailable)
			return true
		})
		defer f.SetBrokerFault(nil)
		clk.SetHorizon(notAfter.Add(-time.Minute))
		clk.WaitParked(t, 30*time.Second)
		if r.m.cert.Load() != served || servedSerial(t, r) != served.leaf.SerialNumber.String() {
			t.Fatal("the certificate was dropped before it expired")
		}
		if len(browserAddrs(r.h, f.Domain)) == 0 {
			t.Fatal("browser addresses withdrawn before expiry")
		}
		w := warnings(r)
		if len(w) != 1 {
			t.Fatalf("%d warnings about the failing renewal, want 1:\n%s", len(w), r.logs)
		}
		t.Logf("%d waits from issuance to a minute before expiry; the operator reads: %s", len(clk.Waits()), w[0].text)

		clk.SetHorizon(notAfter.Add(time.Hour))
		select {
		case e := <-expired.Out():
			if ev := e.(EvtCertificateExpired); !ev.NotAfter.Equal(notAfter) {
				t.Errorf("expiry event %+v, want not after %v", ev, notAfter)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("no EvtCertificateExpired")
		}
		if r.m.cert.Load() != nil {
			t.Fatal("an expired certificate is still loaded")
		}
		if a := browserAddrs(r.h, f.Domain); len(a) != 0 {
			t.Errorf("browser addresses still announced after expiry: %v", a)
		}
		for _, a := range r.h.Network().ListenAddresses() {
			if isForgeListenAddr(a, f.Domain) {
				t.Errorf("WSS listener %s still open after expiry", a)
			}
		}
		pingOverTCP(t, f, r.h)
		r.closeAndCheck(t, leaks)
	})
}
