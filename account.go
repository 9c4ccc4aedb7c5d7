package autotls

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"

	"github.com/mholt/acmez/v3/acme"

	"github.com/p2ptls/autotls/internal/layout"
)

// storedAccount is the ACME account as kept in storage.
type storedAccount = layout.Account

func (i *issuer) accountKey() string { return layout.AccountKey(i.store.issuerKey, i.email) }

// getAccount loads the ACME account from storage, or registers one with
// the CA and stores it.
func (i *issuer) getAccount(ctx context.Context) (acme.Account, error) {
	if i.account != nil {
		return *i.account, nil
	}
	if acct, ok, err := i.loadAccount(ctx); ok || err != nil {
		return acct, err
	}
	// Hosts sharing the storage share the account, and one of them
	// registers it: Let's Encrypt allows 10 registrations per IP address
	// per 3 hours.
	unlock, err := lockStorage(ctx, i.store.s, layout.AccountLock(i.store.issuerKey), i.log)
	if err != nil {
		return acme.Account{}, err
	}
	defer unlock()
	if acct, ok, err := i.loadAccount(ctx); ok || err != nil {
		return acct, err
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return acme.Account{}, fmt.Errorf("generating the ACME account key: %w", err)
	}
	acct := acme.Account{TermsOfServiceAgreed: true, PrivateKey: key}
	if i.email != "" {
		acct.Contact = []string{"mailto:" + i.email}
	}
	acct, err = i.client.NewAccount(ctx, acct)
	if err != nil {
		return acme.Account{}, fmt.Errorf("registering an ACME account at %s: %w", i.client.Directory, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return acme.Account{}, fmt.Errorf("encoding the ACME account key: %w", err)
	}
	blob, err := json.Marshal(storedAccount{
		Location:      acct.Location,
		Contact:       acct.Contact,
		PrivateKeyPEM: string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
	})
	if err != nil {
		return acme.Account{}, fmt.Errorf("encoding the ACME account: %w", err)
	}
	if err := i.store.s.Store(ctx, i.accountKey(), blob); err != nil {
		return acme.Account{}, &storageError{"storing the ACME account", err}
	}
	i.account = &acct
	return acct, nil
}

// loadAccount reads the stored account, if there is a usable one.
func (i *issuer) loadAccount(ctx context.Context) (acme.Account, bool, error) {
	raw, err := i.store.s.Load(ctx, i.accountKey())
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return acme.Account{}, false, nil
	case err != nil:
		return acme.Account{}, false, &storageError{"reading the ACME account", err}
	}
	acct, err := parseStoredAccount(raw)
	if err != nil {
		i.log.Warn("stored ACME account unusable; registering a new one", "key", i.accountKey(), "err", err)
		return acme.Account{}, false, nil
	}
	i.account = &acct
	return acct, true, nil
}

func parseStoredAccount(raw []byte) (acme.Account, error) { return layout.DecodeAccount(raw) }

func (i *issuer) forgetAccount(ctx context.Context) error {
	i.account = nil
	if err := i.store.s.Delete(ctx, i.accountKey()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return &storageError{"deleting the stale ACME account", err}
	}
	return nil
}
