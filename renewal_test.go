package autotls

import (
	"testing"
	"time"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestARIEarlyRenewal: when the CA's renewal information (ARI) moves the
// window of a 90-day certificate into the past, as before a revocation,
// the manager renews at once instead of waiting for day 60.
func TestARIEarlyRenewal(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	h := newHost(t, f, nil, WithStorage(storage.Memory()), withManager(func(m *manager) {
		m.ariFirstPoll = time.Second // production: up to 30 minutes
	}))
	sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	next := func() EvtCertificateLoaded {
		select {
		case e := <-sub.Out():
			return e.(EvtCertificateLoaded)
		case <-time.After(30 * time.Second):
			t.Fatal("no certificate event")
		}
		return EvtCertificateLoaded{}
	}
	first := next()
	addr := waitBrowserAddr(t, h, f.Domain, "/ip4/127.0.0.1/")
	sni := "127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + f.Domain
	st, err := tlsHandshake(tcpHostPort(t, addr), sni, f.IssuerRoots)
	if err != nil {
		t.Fatal(err)
	}
	leaf := st.PeerCertificates[0]
	if leaf.NotAfter.Sub(leaf.NotBefore) < 80*24*time.Hour {
		t.Fatalf("want a long-lived certificate, got %v", leaf.NotAfter.Sub(leaf.NotBefore))
	}
	now := time.Now()
	if err := f.SetRenewalWindow(leaf, now.Add(-2*time.Hour), now.Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	second := next()
	if second.Source != Renewed || second.NotAfter.Before(first.NotAfter) {
		t.Fatalf("second event %+v, want an early renewal", second)
	}
}
