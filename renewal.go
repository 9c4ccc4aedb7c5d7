package autotls

import (
	"context"
	"crypto/x509"
	"errors"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/mholt/acmez/v3/acme"
)

// Renewal timing follows ACME Renewal Information (ARI, RFC 9773) where the
// CA offers it: the CA suggests a window, the client renews at a random
// moment inside it and asks again after the Retry-After the CA gives. A CA
// that plans to revoke a certificate moves the window forward, and renewals
// that name the replaced certificate are exempt from Let's Encrypt's rate
// limits. Without ARI, renewal is due with a third of the lifetime left.
const (
	// The first ARI request for a loaded certificate is spread over this
	// span rather than made at once, so that a restart costs no CA request
	// and a fleet restarting together does not poll together.
	ariFirstPollMax = 30 * time.Minute
	ariDefaultPoll  = 6 * time.Hour
	ariMinPoll      = time.Minute
	ariMaxPoll      = 24 * time.Hour
	ariErrorPoll    = time.Hour
)

// ariState is what the CA said about the certificate in use.
type ariState struct {
	mu          sync.Mutex
	leaf        *x509.Certificate // the certificate this state is about
	nextPoll    time.Time         // when to ask the CA again
	pick        time.Time         // chosen renewal time in the CA's window; zero: none yet
	unsupported bool              // the CA has no ARI
	firstPoll   time.Duration     // bound of the first poll's delay; 0 means ariFirstPollMax
}

// nextStep returns when the next renewal action is due for leaf, and
// whether that action is an ARI poll (true) or the renewal itself.
func (m *manager) nextStep(leaf *x509.Certificate) (time.Time, bool) {
	ratio := m.renewAt(leaf)
	s := &m.ari
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.leaf == nil || !s.leaf.Equal(leaf) {
		first := s.firstPoll
		if first == 0 {
			first = ariFirstPollMax
		}
		s.leaf, s.pick, s.unsupported = leaf, time.Time{}, false
		s.nextPoll = m.cfg.clock.Now().Add(rand.N(first))
	}
	renew := ratio
	if !s.pick.IsZero() {
		renew = s.pick
	}
	if !s.unsupported && s.nextPoll.Before(renew) {
		return s.nextPoll, true
	}
	return renew, false
}

// pollARI asks the CA for leaf's renewal window and picks the renewal
// time in it.
func (m *manager) pollARI(ctx context.Context, leaf *x509.Certificate) {
	ri, err := m.issuer.client.GetRenewalInfo(ctx, leaf)
	now := m.cfg.clock.Now()
	s := &m.ari
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.leaf == nil || !s.leaf.Equal(leaf) {
		return // a new certificate was loaded meanwhile
	}
	switch {
	case errors.Is(err, acme.ErrUnsupported):
		s.unsupported = true
		m.log.Debug("the CA offers no renewal information (ARI); renewing with a third of the lifetime left")
		return
	case err != nil:
		s.nextPoll = now.Add(ariErrorPoll)
		m.log.Debug("asking the CA for renewal information failed", "err", err, "retry_in", ariErrorPoll)
		return
	}
	start, end := ri.SuggestedWindow.Start, ri.SuggestedWindow.End
	if end.Before(start) || start.IsZero() {
		s.nextPoll = now.Add(ariErrorPoll)
		m.log.Debug("the CA's renewal window is malformed", "start", start, "end", end)
		return
	}
	pick := start
	if span := end.Sub(start); span > 0 {
		pick = start.Add(rand.N(span))
	}
	if pick.Before(now) {
		pick = now
	}
	if !pick.Equal(s.pick) && pick.Before(m.renewAt(leaf)) && pick.Sub(now) < 24*time.Hour {
		m.log.Info("the CA asks for an early renewal (ARI)", "window_start", start.Format(time.RFC3339), "explanation", ri.ExplanationURL)
	}
	s.pick = pick
	next := ariDefaultPoll
	if ri.RetryAfter != nil {
		// acmez turns the header into a wall-clock instant; the delay it
		// names is measured on the wall clock, whatever m's clock says.
		next = time.Until(*ri.RetryAfter)
	}
	s.nextPoll = now.Add(min(max(next, ariMinPoll), ariMaxPoll))
}
