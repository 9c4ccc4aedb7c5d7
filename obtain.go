package autotls

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"time"

	"github.com/caddyserver/certmagic"
)

const (
	// lockTimeout bounds the wait for the storage's lock: another process
	// sharing the storage issues in seconds, and a lock that cannot be had
	// is an ordinary failure with its own backoff.
	lockTimeout = time.Minute
	// unlockTimeout bounds the release of the lock, which must happen
	// even when the host is closing.
	unlockTimeout = 10 * time.Second
)

// obtain gets a new certificate (or renews the one in use) and serves it
// once the storage's lock is released.
func (m *manager) obtain(ctx context.Context) error {
	unlock, err := lockStorage(ctx, m.cfg.storage, m.store.lockName(), m.log)
	if err != nil {
		return err
	}
	c, src, err := m.obtainLocked(ctx)
	unlock()
	if err != nil {
		return err
	}
	m.serve(c, src)
	return nil
}

// obtainLocked runs under the storage's lock for the name. It looks at
// storage again first: another process sharing the storage may have stored
// a newer certificate, which is served instead.
func (m *manager) obtainLocked(ctx context.Context) (*servedCert, CertSource, error) {
	cur := m.cert.Load()
	stored, err := m.store.load(ctx, m.clock.Now())
	switch {
	case err == nil && (cur == nil || !stored.leaf.Equal(cur.leaf) && !stored.leaf.NotAfter.Before(cur.leaf.NotAfter)):
		return stored, FromStorage, nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return nil, "", err
	}
	if err := m.checkBudget(ctx, cur, m.clock.Now()); err != nil {
		return nil, "", err
	}

	po, key, err := m.certKey(ctx, cur)
	if err != nil {
		return nil, "", err
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:  pkix.Name{CommonName: m.name},
		DNSNames: []string{m.name},
	}, key)
	if err != nil {
		return nil, "", fmt.Errorf("creating the certificate request: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, "", fmt.Errorf("creating the certificate request: %w", err)
	}
	var replaces *x509.Certificate
	if cur != nil {
		replaces = cur.leaf
	}
	issued, err := m.issuer.obtain(ctx, csr, &po, replaces)
	if err != nil {
		return nil, "", err
	}
	po.Chain = string(issued.ChainPEM)
	c, err := checkCert(issued.ChainPEM, []byte(po.KeyPEM), m.name, m.clock.Now())
	if err != nil {
		return nil, "", fmt.Errorf("the certificate the CA issued (%s) is not usable: %w", issued.URL, err)
	}
	meta, _ := json.Marshal(issued)
	if err := m.store.save(ctx, po, meta); err != nil {
		// The certificate is good: serve it. The pending order, if it was
		// stored, lets the next start complete the write.
		m.log.Warn("could not store the new certificate; serving it from memory (the next start will request it again unless storage recovers)", "err", err)
	}
	// Stored or not, the certificate counts at the CA.
	m.recordIssuance(ctx, c.leaf, m.clock.Now())
	if cur != nil {
		return c, Renewed, nil
	}
	return c, Obtained, nil
}

// lockStorage takes the storage's lock name within lockTimeout, and returns
// the function that releases it.
func lockStorage(ctx context.Context, s certmagic.Storage, name string, log *slog.Logger) (func(), error) {
	lctx, cancel := context.WithTimeout(ctx, lockTimeout)
	defer cancel()
	if err := s.Lock(lctx, name); err != nil {
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case lctx.Err() != nil:
			return nil, &lockError{name: name, err: err}
		}
		return nil, &storageError{"taking the storage lock", err}
	}
	return func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), unlockTimeout)
		defer cancel()
		if err := s.Unlock(uctx, name); err != nil {
			log.Warn("could not release the storage lock", "lock", name, "err", err)
		}
	}, nil
}

// certKey returns the pending order to go on with, and its key: the one
// stored by an earlier attempt, whose order may have a certificate already,
// or else a new one with a fresh ECDSA P-256 key. A key that the
// certificate in use already has is not handed out again: its certificate
// was stored, and only the pending order's deletion was lost.
func (m *manager) certKey(ctx context.Context, cur *servedCert) (pendingOrder, *ecdsa.PrivateKey, error) {
	po, key, err := m.store.loadPending(ctx)
	switch {
	case err == nil:
		if k, ok := key.(*ecdsa.PrivateKey); ok && (cur == nil || !k.PublicKey.Equal(cur.leaf.PublicKey)) {
			po.Chain = ""
			return po, k, nil
		}
	case errors.Is(err, fs.ErrNotExist):
	default:
		var se *storageError
		if errors.As(err, &se) {
			return pendingOrder{}, nil, err
		}
		m.log.Debug("the pending order is unusable; starting afresh", "key", m.store.pendingKey(), "err", err)
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return pendingOrder{}, nil, fmt.Errorf("generating the certificate key: %w", err)
	}
	keyPEM, err := certmagic.PEMEncodePrivateKey(k)
	if err != nil {
		return pendingOrder{}, nil, fmt.Errorf("encoding the certificate key: %w", err)
	}
	return pendingOrder{KeyPEM: string(keyPEM)}, k, nil
}
