package testforge

import (
	"crypto/x509"
	"encoding/hex"
	"fmt"
)

// OfferedChallenge is one challenge of an authorization as Pebble holds
// it: its type and its status.
type OfferedChallenge struct {
	Identifier string // the authorization's identifier, e.g. *.<peer>.<domain>
	Type       string // dns-01, dns-account-01, dns-persist-01, ...
	Status     string // pending (never answered), processing, valid or invalid
}

// Challenges returns the challenges Pebble offered in the authorizations of
// the order that issued leaf, and the status of each now: which types the
// CA offered, and which one the client answered. leaf must have been
// issued by this forge.
func (f *Forge) Challenges(leaf *x509.Certificate) ([]OfferedChallenge, error) {
	order, err := f.pebble.store.GetOrderByIssuedSerial(hex.EncodeToString(leaf.SerialNumber.Bytes()))
	if err != nil {
		return nil, fmt.Errorf("testforge: the order of certificate %x: %w", leaf.SerialNumber, err)
	}
	order.RLock()
	authzs := order.AuthorizationObjects
	order.RUnlock()
	var out []OfferedChallenge
	for _, a := range authzs {
		a.RLock()
		id, chals := a.Identifier.Value, a.Challenges
		a.RUnlock()
		for _, c := range chals {
			c.RLock()
			out = append(out, OfferedChallenge{Identifier: id, Type: c.Type, Status: c.Status})
			c.RUnlock()
		}
	}
	return out, nil
}
