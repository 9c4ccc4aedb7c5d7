package testforge

import (
	"crypto/x509"
	"encoding/json"
	"fmt"
	"time"
)

// SetRenewalWindow makes Pebble's ARI endpoint (RFC 9773) suggest renewing
// leaf between start and end, as a CA does when it plans a revocation.
// leaf must have been issued by this forge.
func (f *Forge) SetRenewalWindow(leaf *x509.Certificate, start, end time.Time) error {
	var w struct {
		SuggestedWindow struct {
			Start time.Time `json:"start"`
			End   time.Time `json:"end"`
		} `json:"suggestedWindow"`
	}
	w.SuggestedWindow.Start, w.SuggestedWindow.End = start.UTC(), end.UTC()
	body, err := json.Marshal(w)
	if err != nil {
		return err
	}
	if err := f.pebble.store.SetARIResponse(leaf.SerialNumber, string(body)); err != nil {
		return fmt.Errorf("setting the renewal window: %w", err)
	}
	return nil
}
