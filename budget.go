package autotls

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/p2ptls/autotls/internal/layout"
)

// The issuance budget. Let's Encrypt issues at most 5 certificates per
// exact set of names per 7 days; a sixth order is refused, and every
// refused order still costs the CA's patience. (It counts with a token
// bucket that refills one every 34 hours; this sliding window, 5 in any
// 7 days, is stricter: it never sends what the bucket would refuse.)
// Hosts sharing a storage (restarts, a fleet with one identity, a rolling
// update) share one record of the certificates issued for the name, so
// that none of them asks for a sixth: each issuance is recorded under the
// issuance lock, right after the pair is stored, and a new order is
// checked against the record under the same lock before anything is sent
// to the CA.
//
// A renewal that names the certificate it replaces while that one is
// still valid (ARI's "replaces") is exempt at Let's Encrypt, so it is not
// held back; it is recorded all the same. The record is per CA directory
// and name; it applies to any CA, whose own limits are at least as loose
// in practice.
const (
	budgetLimit  = layout.BudgetLimit
	budgetWindow = layout.BudgetWindow
)

// issuance is one certificate issued for the name, as recorded.
type issuance = layout.Issuance

// budgetError: a new certificate for name now would be the sixth in seven
// days. It frees up when the oldest of the last five is seven days old.
type budgetError struct {
	name  string
	count int
	frees time.Time
}

func (e *budgetError) Error() string {
	return fmt.Sprintf("%d certificates for %s were issued in the last 7 days, the CA's limit (Let's Encrypt: 5 per exact set of names per week); the next one can be requested at %s",
		e.count, e.name, e.frees.UTC().Format(time.RFC3339))
}

// budgetKey is where the record of issuances for the name is kept.
func (p *pairStore) budgetKey() string {
	return layout.BudgetKey(p.issuerKey, p.name)
}

// checkBudget returns a *budgetError if a new order for the name, at now,
// would exceed the budget, unless it renews cur while cur is still valid.
// It runs under the issuance lock, before any request to the CA.
func (m *manager) checkBudget(ctx context.Context, cur *servedCert, now time.Time) error {
	if cur != nil && now.Before(cur.leaf.NotAfter) {
		return nil // an ARI renewal: exempt
	}
	recent, err := m.store.issuances(ctx, now)
	if err != nil {
		return err
	}
	if len(recent) < budgetLimit {
		return nil
	}
	// recent is oldest first: the budget frees up when all but four of
	// them have left the window.
	return &budgetError{name: m.name, count: len(recent), frees: recent[len(recent)-budgetLimit].At.Add(budgetWindow)}
}

// recordIssuance adds leaf, issued at now, to the record, dropping the
// entries that have left the window. It runs under the issuance lock.
func (m *manager) recordIssuance(ctx context.Context, leaf *x509.Certificate, now time.Time) {
	recent, err := m.store.issuances(ctx, now)
	if err == nil {
		recent = append(recent, issuance{At: now.UTC(), Serial: leaf.SerialNumber.Text(16)})
		var blob []byte
		if blob, err = json.Marshal(recent); err == nil {
			err = m.store.s.Store(ctx, m.store.budgetKey(), blob)
		}
	}
	if err != nil {
		m.log.Warn("could not record the new certificate in the issuance budget; hosts sharing this storage may request more than the CA allows", "key", m.store.budgetKey(), "err", err)
	}
}

// issuances returns the recorded issuances still within the window at
// now, oldest first. A record that cannot be decoded is taken as empty
// (it is rewritten with the next issuance); one that cannot be read is a
// *storageError, so that no order is sent while it is unknown how many
// certificates the CA has issued.
func (p *pairStore) issuances(ctx context.Context, now time.Time) ([]issuance, error) {
	raw, err := p.s.Load(ctx, p.budgetKey())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, &storageError{"reading the issuance budget", err}
	}
	var all []issuance
	if err := json.Unmarshal(raw, &all); err != nil {
		p.log.Warn("the issuance budget is unreadable; starting it afresh", "key", p.budgetKey(), "err", err)
		return nil, nil
	}
	return layout.Recent(all, now), nil
}
