package autotls

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/p2ptls/autotls/internal/layout"
)

// pairStore keeps the certificate and key of one name in a
// certmagic.Storage, in certmagic's layout (StorageKeys), so that what an
// earlier release stored is read as it is.
//
// Writing a new pair is crash-safe. The pending order (the key, from just
// before the CSR is sent; then the order and, once downloaded, the chain)
// is written first, under its own key; only then are the key, the
// certificate and the metadata overwritten, and the pending order deleted.
// A crash at any point leaves either the old pair intact, or a pending
// order from which [pairStore.load] completes the new one, with no
// request to anyone.
type pairStore struct {
	s         certmagic.Storage
	issuerKey string
	name      string
	log       *slog.Logger
}

// The records kept in storage, and where: see [layout].
type (
	pendingOrder = layout.PendingOrder
	certMeta     = layout.CertMeta
)

// issuerKey names the CA in storage paths ([layout.IssuerKey]).
func issuerKey(caURL string) string { return layout.IssuerKey(caURL) }

// asideSuffix marks an unusable pair moved aside ([layout.AsideSuffix]).
const asideSuffix = layout.AsideSuffix

func (p *pairStore) certKey() string    { return layout.CertKey(p.issuerKey, p.name) }
func (p *pairStore) keyKey() string     { return layout.PrivateKeyKey(p.issuerKey, p.name) }
func (p *pairStore) metaKey() string    { return layout.MetaKey(p.issuerKey, p.name) }
func (p *pairStore) pendingKey() string { return layout.PendingKey(p.issuerKey, p.name) }
func (p *pairStore) lockName() string   { return layout.IssueLock(p.name) }

// load returns the stored pair, checked whole ([checkCert]) at now. A pair
// torn by a crash is completed from the pending order. An expired pair is
// deleted (a CA will not renew what it no longer considers current). An
// unusable one is moved aside with one warning. It returns an error
// satisfying errors.Is(err, fs.ErrNotExist) when nothing usable is stored.
func (p *pairStore) load(ctx context.Context, now time.Time) (*servedCert, error) {
	c, err := p.loadPair(ctx, now)
	var bad *unusableError
	var exp *expiredError
	switch {
	case err == nil:
		return p.settlePending(ctx, c, now), nil
	case errors.As(err, &exp):
		p.log.Info("stored certificate expired; deleting it so that a fresh one is issued", "not_after", exp.NotAfter.Format(time.RFC3339))
		p.delete(ctx, "")
		return nil, fmt.Errorf("%w: %w", fs.ErrNotExist, err)
	case errors.Is(err, fs.ErrNotExist) || errors.As(err, &bad):
		if c, perr := p.completePending(ctx, now); perr == nil {
			return c, nil
		}
		if bad == nil {
			return nil, err
		}
		if aerr := p.delete(ctx, asideSuffix); aerr != nil {
			return nil, &storageError{"moving the unusable certificate aside", aerr}
		}
		p.log.Warn("stored certificate unusable; moved it aside and requesting a new one", "key", p.certKey()+asideSuffix, "err", err)
		return nil, fmt.Errorf("%w: %w", fs.ErrNotExist, err)
	}
	return nil, err
}

// loadPair reads and checks the stored certificate and key.
func (p *pairStore) loadPair(ctx context.Context, now time.Time) (*servedCert, error) {
	certPEM, err := p.s.Load(ctx, p.certKey())
	if err != nil {
		return nil, notExistOr(err, "reading the certificate")
	}
	keyPEM, err := p.s.Load(ctx, p.keyKey())
	if err != nil {
		return nil, notExistOr(err, "reading the certificate key")
	}
	return checkCert(certPEM, keyPEM, p.name, now)
}

func notExistOr(err error, op string) error {
	if errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return &storageError{op, err}
}

// completePending finishes a write that a crash interrupted: the pending
// order holds a whole, valid pair.
func (p *pairStore) completePending(ctx context.Context, now time.Time) (*servedCert, error) {
	po, _, err := p.loadPending(ctx)
	if err != nil {
		return nil, err
	}
	if po.Chain == "" {
		return nil, fs.ErrNotExist
	}
	c, err := checkCert([]byte(po.Chain), []byte(po.KeyPEM), p.name, now)
	if err != nil {
		return nil, err
	}
	if err := p.writePair(ctx, []byte(po.Chain), []byte(po.KeyPEM), nil); err != nil {
		return nil, err
	}
	p.log.Info("completed storing a certificate that an earlier run obtained", "not_after", c.leaf.NotAfter.Format(time.RFC3339))
	p.forgetPending(ctx)
	return c, nil
}

// save stores a new pair: first in the pending order, then in place.
func (p *pairStore) save(ctx context.Context, po pendingOrder, meta json.RawMessage) error {
	if err := p.storePending(ctx, po); err != nil {
		return err
	}
	if err := p.writePair(ctx, []byte(po.Chain), []byte(po.KeyPEM), meta); err != nil {
		return err
	}
	p.forgetPending(ctx)
	return nil
}

func (p *pairStore) writePair(ctx context.Context, chain, key []byte, issuerData json.RawMessage) error {
	meta, err := json.Marshal(certMeta{SANs: []string{p.name}, IssuerData: issuerData})
	if err != nil {
		return err
	}
	for _, kv := range []struct {
		k string
		v []byte
	}{{p.keyKey(), key}, {p.certKey(), chain}, {p.metaKey(), meta}} {
		if err := p.s.Store(ctx, kv.k, kv.v); err != nil {
			return &storageError{"storing the certificate", err}
		}
	}
	return nil
}

// delete removes the stored certificate, key and metadata. With a
// suffix, each is first copied to its key plus suffix, for the operator
// to look at; nothing is deleted unless its copy was stored.
func (p *pairStore) delete(ctx context.Context, suffix string) error {
	for _, k := range []string{p.certKey(), p.keyKey(), p.metaKey()} {
		if suffix != "" {
			v, err := p.s.Load(ctx, k)
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return err
			}
			if err := p.s.Store(ctx, k+suffix, v); err != nil {
				return err
			}
		}
		if err := p.s.Delete(ctx, k); err != nil && !errors.Is(err, fs.ErrNotExist) {
			if suffix != "" {
				return err
			}
			p.log.Warn("could not delete the expired certificate from storage", "key", k, "err", err)
		}
	}
	return nil
}

// loadPending returns the pending order and its key, or fs.ErrNotExist.
func (p *pairStore) loadPending(ctx context.Context) (pendingOrder, crypto.Signer, error) {
	raw, err := p.s.Load(ctx, p.pendingKey())
	if err != nil {
		return pendingOrder{}, nil, notExistOr(err, "reading the pending order")
	}
	return layout.DecodePending(raw)
}

func (p *pairStore) storePending(ctx context.Context, po pendingOrder) error {
	blob, err := json.Marshal(po)
	if err != nil {
		return err
	}
	if err := p.s.Store(ctx, p.pendingKey(), blob); err != nil {
		return &storageError{"storing the pending order", err}
	}
	return nil
}

// forgetPending deletes the pending order: its certificate is stored.
func (p *pairStore) forgetPending(ctx context.Context) {
	if err := p.s.Delete(ctx, p.pendingKey()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		p.log.Debug("deleting the pending order", "key", p.pendingKey(), "err", err)
	}
}

// settlePending looks at a pending order that holds a whole chain, next to
// the valid stored pair c. A crash came after the chain was downloaded:
// before the pair was overwritten (the pending chain is newer: it is
// completed and returned) or after (it is c's: the record is deleted).
func (p *pairStore) settlePending(ctx context.Context, c *servedCert, now time.Time) *servedCert {
	po, _, err := p.loadPending(ctx)
	if err != nil || po.Chain == "" {
		return c
	}
	pc, err := checkCert([]byte(po.Chain), []byte(po.KeyPEM), p.name, now)
	switch {
	case err != nil:
		return c
	case pc.leaf.Equal(c.leaf):
		p.forgetPending(ctx)
	case !pc.leaf.NotAfter.Before(c.leaf.NotAfter): // newer (to the second)
		if newer, err := p.completePending(ctx, now); err == nil {
			return newer
		}
	}
	return c
}
