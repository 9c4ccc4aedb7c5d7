package autotls

// Fault tests of storage shared between hosts of one identity: a fleet
// behind one PeerID sharing a database, or a restarted process overlapping
// the old one. The storage's lock makes them issue one certificate between
// them; the others take it from storage.

import (
	"context"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// lockWatch is a storage that reports each call to Lock, before taking
// the lock, so that a test can wait until a host waits for it.
type lockWatch struct {
	certmagic.Storage
	locking chan<- string
}

func (s lockWatch) Lock(ctx context.Context, name string) error {
	select {
	case s.locking <- name:
	default:
	}
	return s.Storage.Lock(ctx, name)
}

// TestSharedStorageSource: two hosts with the same identity key and the
// same storage start together. The registration of whichever takes the
// storage's lock first is held at the broker until the other one waits
// for the lock too. Exactly one certificate is issued (one account, one
// registration, one finalization at the CA); the other host finds it in
// storage once it has the lock. Both serve the same serial, and their
// EvtCertificateLoaded (read from the stateful emitter of each) say
// Obtained and FromStorage.
func TestSharedStorageSource(t *testing.T) {
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	key := genKey(t, crypto.Ed25519)
	locking := make(chan string, 8)
	st := lockWatch{Storage: storage.Memory(), locking: locking}
	release := make(chan struct{})
	var held atomic.Bool
	f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == registerPath && held.CompareAndSwap(false, true) {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		return false
	})
	defer f.SetBrokerFault(nil)
	before := f.Stats()
	start := func() *faultRig {
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(time.Minute)) // before the first ARI poll can be due
		return startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st), WithCA(ca.URL, ca.Roots))
	}
	rigs := []*faultRig{start(), start()}
	for range rigs {
		select {
		case <-locking:
		case <-time.After(30 * time.Second):
			close(release)
			t.Fatal("both hosts did not come to take the storage's lock within 30 s")
		}
	}
	close(release)

	var sources []CertSource
	var serials []string
	for _, r := range rigs {
		c := r.waitLoaded(t)
		sources = append(sources, waitCert(t, r.h, 30*time.Second).Source) // the stateful event: this host's certificate
		serials = append(serials, servedSerial(t, r))
		if serials[len(serials)-1] != c.leaf.SerialNumber.String() {
			t.Errorf("a host serves serial %s, not that of its certificate (%s)", serials[len(serials)-1], c.leaf.SerialNumber)
		}
		if n := len(r.fails.all()); n != 0 {
			t.Errorf("%d failed attempts, want none:\n%s", n, r.logs)
		}
	}
	t.Logf("sources %v, serials %v", sources, serials)
	slices.Sort(sources)
	if want := []CertSource{Obtained, FromStorage}; !slices.Equal(sources, want) {
		t.Errorf("certificate sources %v, want one %s and one %s", sources, Obtained, FromStorage)
	}
	if serials[0] == "" || serials[0] != serials[1] {
		t.Errorf("the hosts serve serials %q and %q, want the same", serials[0], serials[1])
	}
	if n := f.Stats().Registered - before.Registered; n != 1 {
		t.Errorf("%d registrations at the broker, want 1", n)
	}
	reqs := ca.Requests()
	if n := count(reqs, http.MethodPost, "/finalize-order/"); n != 1 {
		t.Errorf("%d finalizations at the CA, want 1", n)
	}
	if n := count(reqs, http.MethodPost, "/sign-me-up"); n != 1 {
		t.Errorf("%d ACME accounts created, want 1", n)
	}
	for _, r := range rigs {
		r.close(t)
	}
	ca.Close()
	leaks()
}

// TestSharedStorageOneAccount: hosts of different identities sharing one
// storage, started together, register one ACME account between them (Let's
// Encrypt allows 10 registrations per IP address per 3 hours): the first
// registers it under the storage's account lock, the others read it.
func TestSharedStorageOneAccount(t *testing.T) {
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	st := storage.Memory()
	// The health checks wait for each other, so that the four hosts come
	// to the account together.
	const hosts = 4
	var arrived atomic.Int32
	all := make(chan struct{})
	f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != healthPath {
			return false
		}
		if arrived.Add(1) == hosts {
			close(all)
		}
		select {
		case <-all:
		case <-r.Context().Done():
		}
		return false
	})
	defer f.SetBrokerFault(nil)
	var rigs []*faultRig
	for range hosts {
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(time.Minute)) // before the first ARI poll can be due
		rigs = append(rigs, startRig(t, f, clk, nil, nil, WithStorage(st), WithCA(ca.URL, ca.Roots)))
	}
	for _, r := range rigs {
		r.waitLoaded(t)
	}
	if n := count(ca.Requests(), http.MethodPost, "/sign-me-up"); n != 1 {
		t.Errorf("%d ACME accounts registered by 4 hosts sharing storage, want 1", n)
	}
	for _, r := range rigs {
		r.close(t)
	}
	ca.Close()
	leaks()
}
