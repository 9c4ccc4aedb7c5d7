package autotls

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"

	"github.com/mholt/acmez/v3/acme"
)

// Renewal timing follows ACME Renewal Information (ARI, RFC 9773) where the
// CA offers it: the CA suggests a window, the client renews at a random
// moment inside it and asks again after the Retry-After the CA gives. A CA
// that plans to revoke a certificate moves the window forward, and renewals
// that name the replaced certificate are exempt from Let's Encrypt's rate
// limits. Without ARI, renewal is due with a third of the lifetime left
// (half, for lifetimes under ten days).
const (
	// The first ARI request for a loaded certificate comes between half
	// this span and all of it, rather than at once, so that a restart
	// costs no CA request and a fleet restarting together does not poll
	// together.
	ariFirstPollMax = 30 * time.Minute
	ariDefaultPoll  = 6 * time.Hour
	ariMinPoll      = time.Minute
	ariMaxPoll      = 24 * time.Hour
	ariErrorPoll    = time.Hour
)

// ariState is what the CA said about the certificate in use. The run
// goroutine owns it.
type ariState struct {
	leaf        *x509.Certificate // the certificate this state is about
	nextPoll    time.Time         // when to ask the CA again
	pick        time.Time         // chosen renewal time in the CA's window; zero: none yet
	unsupported bool              // the CA has no ARI
	profileSaid bool              // WithProfile's name was checked (profile.go)
}

// renewAt is when leaf is due for renewal without ARI.
func renewAt(leaf *x509.Certificate) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	left := life / 3
	if life < 10*24*time.Hour {
		left = life / 2
	}
	return leaf.NotAfter.Add(-left)
}

// next returns when the next renewal step is due for leaf at now, and
// whether that step is an ARI poll (true) or the renewal itself.
func (s *ariState) next(leaf *x509.Certificate, now time.Time, firstPoll time.Duration) (time.Time, bool) {
	if s.leaf == nil || !s.leaf.Equal(leaf) {
		*s = ariState{leaf: leaf, nextPoll: now.Add(firstPoll/2 + rand.N(firstPoll/2+1))}
	}
	renew := renewAt(leaf)
	if !s.pick.IsZero() {
		renew = s.pick
	}
	if !s.unsupported && s.nextPoll.Before(renew) {
		return s.nextPoll, true
	}
	return renew, false
}

// pollARI asks the CA for leaf's renewal window and picks the renewal time
// in it.
func (m *manager) pollARI(ctx context.Context, s *ariState, leaf *x509.Certificate) {
	m.checkProfileEarly(ctx, s)
	ri, err := m.issuer.renewalInfo(ctx, leaf)
	now := m.clock.Now()
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
	pick = maxTime(pick, now)
	if !pick.Equal(s.pick) && pick.Before(renewAt(leaf)) && pick.Sub(now) < 24*time.Hour {
		m.log.Info("the CA asks for an early renewal (ARI)", "window_start", start.Format(time.RFC3339), "explanation", ri.ExplanationURL)
	}
	s.pick = pick
	next := ariDefaultPoll
	if at, ok := m.issuer.ra.latest(); ok {
		next = at.Sub(now) // the response's Retry-After, on the manager's clock
	}
	s.nextPoll = now.Add(min(max(next, ariMinPoll), ariMaxPoll))
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// renewalInfo asks the CA for leaf's renewal window (ARI, RFC 9773): one
// unauthenticated GET, no retry of its own (acmez's GetRenewalInfo sleeps
// and retries behind the manager's clock; the run loop asks again later).
func (i *issuer) renewalInfo(ctx context.Context, leaf *x509.Certificate) (acme.RenewalInfo, error) {
	dir, err := i.client.GetDirectory(ctx)
	if err != nil {
		return acme.RenewalInfo{}, err
	}
	if dir.RenewalInfo == "" {
		return acme.RenewalInfo{}, acme.ErrUnsupported
	}
	id, err := acme.ARIUniqueIdentifier(leaf)
	if err != nil {
		return acme.RenewalInfo{}, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(dir.RenewalInfo, "/")+"/"+id, nil)
	if err != nil {
		return acme.RenewalInfo{}, err
	}
	req.Header.Set("User-Agent", i.client.UserAgent)
	resp, err := i.client.HTTPClient.Do(req)
	if err != nil {
		return acme.RenewalInfo{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return acme.RenewalInfo{}, fmt.Errorf("renewal information: %s", resp.Status)
	}
	var ri acme.RenewalInfo
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&ri); err != nil {
		return acme.RenewalInfo{}, fmt.Errorf("decoding the renewal information: %w", err)
	}
	return ri, nil
}
