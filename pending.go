package autotls

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/mholt/acmez/v3/acme"
)

// A process that dies between the CA issuing a certificate and certmagic
// storing it would, on restart, order another: certmagic keeps the
// certificate's private key in memory until then, and a CA does not list
// an account's orders. Each certificate counts against the CA's limit on
// the name (Let's Encrypt: 5 a week). So the issuer keeps a pending order
// in storage from just before the CSR is sent until the certificate is
// stored: the order's URL and the private key, which the issuer hands to
// certmagic as its KeySource. On the next attempt, in this process or the
// next, the same key is handed out and the order is taken up where the CA
// has it: downloaded if valid, polled if processing, finalized if ready.

// pendingOrder is the pending order as kept in storage.
type pendingOrder struct {
	KeyPEM string `json:"private_key_pem"`
	Order  string `json:"order,omitempty"` // the order's URL, once created
}

// pendingStoreTimeout bounds the storage calls made from GenerateKey,
// which certmagic calls without a context.
const pendingStoreTimeout = 30 * time.Second

func (i *acmeIssuer) pendingKey() string {
	return "autotls/acme/" + i.key + "/pending/" + certmagic.StorageKeys.Safe(i.name) + ".json"
}

// loadPending returns the pending order and its key, or fs.ErrNotExist.
func (i *acmeIssuer) loadPending(ctx context.Context) (pendingOrder, crypto.Signer, error) {
	raw, err := i.storage.Load(ctx, i.pendingKey())
	if err != nil {
		return pendingOrder{}, nil, err
	}
	var p pendingOrder
	if err := json.Unmarshal(raw, &p); err != nil {
		return pendingOrder{}, nil, fmt.Errorf("decoding the pending order: %w", err)
	}
	key, err := certmagic.PEMDecodePrivateKey([]byte(p.KeyPEM))
	if err != nil {
		return pendingOrder{}, nil, fmt.Errorf("decoding the pending order's key: %w", err)
	}
	return p, key, nil
}

func (i *acmeIssuer) storePending(ctx context.Context, p pendingOrder) error {
	blob, err := json.Marshal(p)
	if err != nil {
		return err
	}
	return i.storage.Store(ctx, i.pendingKey(), blob)
}

// forgetPending deletes the pending order: its certificate is stored.
func (i *acmeIssuer) forgetPending(ctx context.Context) {
	if err := i.storage.Delete(ctx, i.pendingKey()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		i.log.Debug("deleting the pending order", "key", i.pendingKey(), "err", err)
	}
}

// GenerateKey implements certmagic.KeyGenerator: the pending order's key
// if there is one, or else a new ECDSA P-256 key (certmagic's default). A
// key that the certificate in use already has is not handed out again: its
// certificate was stored, and only the pending order's deletion was lost.
func (i *acmeIssuer) GenerateKey() (crypto.PrivateKey, error) {
	ctx, cancel := context.WithTimeout(context.Background(), pendingStoreTimeout)
	defer cancel()
	_, key, err := i.loadPending(ctx)
	switch {
	case err == nil:
		if cur := i.current(); cur == nil || !samePublicKey(cur.PublicKey, key.Public()) {
			i.setLastKey(key)
			return key, nil
		}
	case !errors.Is(err, fs.ErrNotExist):
		i.log.Debug("the pending order is unusable; starting afresh", "key", i.pendingKey(), "err", err)
	}
	fresh, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the certificate key: %w", err)
	}
	i.setLastKey(fresh)
	return fresh, nil
}

func (i *acmeIssuer) setLastKey(k crypto.Signer) {
	i.keyMu.Lock()
	i.lastKey = k
	i.keyMu.Unlock()
}

// rememberOrder stores the pending order, the order at loc for csr, just
// before the CSR goes to the CA: from then on a certificate may exist that
// only this key can use. (Before, a crash loses only an order that has no
// certificate, and authorizations the CA reuses.) One storage write, none
// if the record is there already.
func (i *acmeIssuer) rememberOrder(ctx context.Context, csr *x509.CertificateRequest, loc string) {
	i.keyMu.Lock()
	key := i.lastKey
	i.keyMu.Unlock()
	if key == nil || !samePublicKey(key.Public(), csr.PublicKey) {
		return // not a key of ours: nothing to remember it by
	}
	if p, stored, err := i.loadPending(ctx); err == nil && p.Order == loc && samePublicKey(stored.Public(), csr.PublicKey) {
		return
	}
	keyPEM, err := certmagic.PEMEncodePrivateKey(key)
	if err == nil {
		err = i.storePending(ctx, pendingOrder{KeyPEM: string(keyPEM), Order: loc})
	}
	if err != nil {
		// Issuance does not depend on it; only a crash before the
		// certificate is stored would then cost a new certificate.
		i.log.Debug("storing the pending order", "key", i.pendingKey(), "err", err)
	}
}

// resumeOrder returns the pending order for csr's key and identifiers as
// the CA has it now, if it can still give a certificate (pending, ready,
// processing or valid).
func (i *acmeIssuer) resumeOrder(ctx context.Context, account acme.Account, csr *x509.CertificateRequest, ids []acme.Identifier) (acme.Order, bool) {
	p, key, err := i.loadPending(ctx)
	if err != nil || p.Order == "" || !samePublicKey(key.Public(), csr.PublicKey) {
		return acme.Order{}, false
	}
	order, err := i.client.GetOrder(ctx, account, acme.Order{Location: p.Order})
	if err != nil {
		i.log.Debug("the pending order cannot be read; ordering anew", "order", p.Order, "err", err)
		return acme.Order{}, false
	}
	if !sameIdentifiers(order.Identifiers, ids) {
		return acme.Order{}, false
	}
	switch order.Status {
	case acme.StatusPending, acme.StatusReady, acme.StatusProcessing, acme.StatusValid:
		i.log.Info("taking up the pending order", "order", p.Order, "status", order.Status)
		return order, true
	}
	i.log.Debug("the pending order is over; ordering anew", "order", p.Order, "status", order.Status)
	return acme.Order{}, false
}

func samePublicKey(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

func sameIdentifiers(a, b []acme.Identifier) bool {
	key := func(id acme.Identifier) string { return id.Type + ":" + id.Value }
	ka, kb := make([]string, len(a)), make([]string, len(b))
	for n, id := range a {
		ka[n] = key(id)
	}
	for n, id := range b {
		kb[n] = key(id)
	}
	slices.Sort(ka)
	slices.Sort(kb)
	return slices.Equal(ka, kb)
}
