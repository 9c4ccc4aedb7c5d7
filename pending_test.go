package autotls

import (
	"crypto"
	"testing"
	"time"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestPendingOrderOfCertificateInUse: a process that stopped after storing
// its certificate but before deleting the pending order leaves a pending
// order holding the key of the certificate in use. The next renewal must
// not take that key up again (nor its order, which would only give the same
// certificate back): it gets a fresh key and a new certificate, and the
// pending order is gone afterwards.
func TestPendingOrderOfCertificateInUse(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	st := storage.Memory()
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute)) // before the first ARI poll can be due
	r := startRig(t, f, clk, nil, nil, WithStorage(st))
	served := r.waitLoaded(t)

	ctx := t.Context()
	keyPEM, err := st.Load(ctx, r.m.store.keyKey())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.m.store.storePending(ctx, pendingOrder{KeyPEM: string(keyPEM)}); err != nil {
		t.Fatal(err)
	}

	r.kick(t) // renewal due
	renewed := r.waitRenewed(t, served)
	if samePublicKey(renewed.leaf.PublicKey, served.leaf.PublicKey) {
		t.Error("the renewal took up the key of the certificate in use")
	}
	if st.Exists(ctx, r.m.store.pendingKey()) {
		t.Error("the pending order outlived the renewal")
	}
	r.closeAndCheck(t, leaks)
}

func samePublicKey(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}
