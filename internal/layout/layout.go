// Package layout says where autotls keeps what in a certmagic.Storage, and
// in what form: the keys of the certificate, its private key and metadata
// (certmagic's own layout, so that what certmagic or an earlier release
// stored is read as it is), of the pending order, the ACME account and the
// issuance record, the lock names, and the records stored under them; and
// the DNS names they are for (the certificate name, the PeerID and IP
// labels).
//
// The library writes storage through it, and cmd/autotls reads the same
// storage through it; neither keeps its own copy of a key name.
package layout

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/mholt/acmez/v3/acme"
)

// IssuerKey names the CA in storage keys, as certmagic's ACME issuer does:
// the directory URL's host and path ("acme-v02.api.letsencrypt.org-directory").
func IssuerKey(caURL string) string {
	u, err := url.Parse(caURL)
	if err != nil {
		return certmagic.StorageKeys.Safe(caURL)
	}
	return certmagic.StorageKeys.Safe(strings.ReplaceAll(u.Host+u.Path, "/", "-"))
}

// CertsRoot is the prefix under which certificates are stored, one
// directory per issuer key.
func CertsRoot() string { return path.Dir(certmagic.StorageKeys.CertsPrefix("x")) }

// CertKey is the key of the certificate chain (PEM) for name, issued by
// the CA with the issuer key issuer.
func CertKey(issuer, name string) string { return certmagic.StorageKeys.SiteCert(issuer, name) }

// PrivateKeyKey is the key of the certificate's private key (PEM).
func PrivateKeyKey(issuer, name string) string {
	return certmagic.StorageKeys.SitePrivateKey(issuer, name)
}

// MetaKey is the key of certmagic's metadata for the certificate
// ([CertMeta] as JSON).
func MetaKey(issuer, name string) string { return certmagic.StorageKeys.SiteMeta(issuer, name) }

// PendingKey is the key of the pending order for name ([PendingOrder] as
// JSON), present only while a certificate is being obtained or stored.
func PendingKey(issuer, name string) string {
	return "autotls/acme/" + issuer + "/pending/" + certmagic.StorageKeys.Safe(name) + ".json"
}

// BudgetKey is the key of the record of certificates issued for name
// ([]Issuance as JSON).
func BudgetKey(issuer, name string) string {
	return "autotls/issuance/" + issuer + "/" + certmagic.StorageKeys.Safe(name) + ".json"
}

// AccountKey is the key of the ACME account ([Account] as JSON) registered
// with the contact email, or without one if email is empty.
func AccountKey(issuer, email string) string {
	name := "default"
	if email != "" {
		name = certmagic.StorageKeys.Safe(email)
	}
	return "autotls/acme/" + issuer + "/accounts/" + name + ".json"
}

// IssueLock is the storage's lock name for issuing name: certmagic's, so
// that an earlier release sharing the storage is excluded too.
func IssueLock(name string) string { return "issue_cert_" + name }

// AccountLock is the storage's lock name for registering an account with
// the CA of issuer.
func AccountLock(issuer string) string { return "register_account_" + issuer }

// AsideSuffix is appended to the keys of an unusable certificate, key and
// metadata when they are moved aside.
const AsideSuffix = ".unusable"

// PendingOrder is the pending order as kept in storage. Fields added since
// the first release are optional, so that either release reads the other's.
type PendingOrder struct {
	KeyPEM string `json:"private_key_pem"`
	Order  string `json:"order,omitempty"`     // the order's URL, once created
	Chain  string `json:"chain_pem,omitempty"` // the issued chain, once downloaded
}

// DecodePending decodes a stored pending order and its key.
func DecodePending(raw []byte) (PendingOrder, crypto.Signer, error) {
	var po PendingOrder
	if err := json.Unmarshal(raw, &po); err != nil {
		return PendingOrder{}, nil, fmt.Errorf("decoding the pending order: %w", err)
	}
	key, err := certmagic.PEMDecodePrivateKey([]byte(po.KeyPEM))
	if err != nil {
		return PendingOrder{}, nil, fmt.Errorf("decoding the pending order's key: %w", err)
	}
	return po, key, nil
}

// CertMeta is certmagic's metadata file for a certificate
// (certmagic.CertificateResource as JSON).
type CertMeta struct {
	SANs       []string        `json:"sans,omitempty"`
	IssuerData json.RawMessage `json:"issuer_data,omitempty"`
}

// Account is the ACME account as kept in storage.
type Account struct {
	Location      string   `json:"location"`
	Contact       []string `json:"contact,omitempty"`
	PrivateKeyPEM string   `json:"private_key_pem"`
}

// DecodeAccount decodes a stored account into one ready to sign requests.
func DecodeAccount(raw []byte) (acme.Account, error) {
	var sa Account
	if err := json.Unmarshal(raw, &sa); err != nil {
		return acme.Account{}, fmt.Errorf("decoding: %w", err)
	}
	block, _ := pem.Decode([]byte(sa.PrivateKeyPEM))
	if block == nil || sa.Location == "" {
		return acme.Account{}, errors.New("no key or location")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return acme.Account{}, fmt.Errorf("parsing the key: %w", err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return acme.Account{}, errors.New("key cannot sign")
	}
	return acme.Account{Status: acme.StatusValid, Location: sa.Location, Contact: sa.Contact, TermsOfServiceAgreed: true, PrivateKey: signer}, nil
}

// The issuance budget: Let's Encrypt issues at most BudgetLimit
// certificates per exact set of names per BudgetWindow.
const (
	BudgetLimit  = 5
	BudgetWindow = 7 * 24 * time.Hour
)

// Issuance is one certificate issued for the name, as recorded under
// [BudgetKey].
type Issuance struct {
	At     time.Time `json:"at"`     // on the recording host's clock
	Serial string    `json:"serial"` // hexadecimal
}

// Recent returns the issuances of all still within [BudgetWindow] at now,
// oldest first. It reorders all.
func Recent(all []Issuance, now time.Time) []Issuance {
	recent := slices.DeleteFunc(all, func(i Issuance) bool { return !i.At.Add(BudgetWindow).After(now) })
	slices.SortFunc(recent, func(a, b Issuance) int { return a.At.Compare(b.At) })
	return recent
}
