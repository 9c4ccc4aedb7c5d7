package autotls

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/mholt/acmez/v3"
	"github.com/mholt/acmez/v3/acme"
	ma "github.com/multiformats/go-multiaddr"
)

// Bounds of the TXT propagation check. The broker's DNS answers with TTL 10 s,
// so a recursive resolver can lag by that much; three minutes is the ceiling
// before the attempt is abandoned without asking the CA to validate (an
// authorization that fails validation counts against the CA's limits).
// During the first minute the record is seen within txtFastBackoff of its
// appearing; a query that gets no answer costs at most txtQueryTimeout.
const (
	txtWaitTimeout  = 3 * time.Minute
	txtFirstBackoff = 10 * time.Millisecond
	txtFastBackoff  = 250 * time.Millisecond
	txtFastSpan     = time.Minute
	txtMaxBackoff   = 2 * time.Second
	txtQueryTimeout = time.Second
)

// dns01Solver fulfils the DNS-01 challenge through the forge's broker.
type dns01Solver struct {
	broker   *brokerClient
	resolver *net.Resolver
	// addrs returns the addresses to send to the broker for its dial-back.
	addrs func() ([]ma.Multiaddr, error)
	clock clock
	// waitTimeout bounds Wait; zero means txtWaitTimeout.
	waitTimeout time.Duration
}

var (
	_ acmez.Solver = (*dns01Solver)(nil)
	_ acmez.Waiter = (*dns01Solver)(nil)
)

// Present asks the broker to publish the key-authorization digest as the
// TXT record _acme-challenge.<peerid>.<forge>. The broker dials the host
// back on the addresses sent before it accepts.
func (s *dns01Solver) Present(ctx context.Context, chal acme.Challenge) error {
	addrs, err := s.addrs()
	if err != nil {
		return err
	}
	if err := s.broker.register(ctx, chal.DNS01KeyAuthorization(), addrs); err != nil {
		return fmt.Errorf("registering the DNS-01 challenge with the broker: %w", err)
	}
	return nil
}

// Wait returns once the TXT record is visible through the configured
// resolver, so that the CA is only asked to validate what it can see. The
// first lookup is immediate; later ones back off quickly to a cap.
func (s *dns01Solver) Wait(ctx context.Context, chal acme.Challenge) error {
	timeout := s.waitTimeout
	if timeout == 0 {
		timeout = txtWaitTimeout
	}
	start := s.clock.Now()
	// A trailing dot keeps the name from being tried with search domains.
	name := strings.TrimSuffix(chal.DNS01TXTRecordName(), ".") + "."
	want := chal.DNS01KeyAuthorization()
	backoff := txtFirstBackoff
	var lastErr error
	for {
		qctx, cancel := context.WithTimeout(ctx, txtQueryTimeout)
		txts, err := s.resolver.LookupTXT(qctx, name)
		cancel()
		if err == nil && slices.Contains(txts, want) {
			return nil
		}
		if err != nil {
			lastErr = err
		} else {
			lastErr = fmt.Errorf("found %d other TXT value(s)", len(txts))
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		elapsed := s.clock.Now().Sub(start)
		if elapsed+backoff > timeout {
			return &txtNotVisibleError{name: name, timeout: timeout, last: lastErr}
		}
		if err := sleep(ctx, s.clock, backoff); err != nil {
			return err
		}
		ceiling := txtMaxBackoff
		if elapsed < txtFastSpan {
			ceiling = txtFastBackoff
		}
		backoff = min(backoff*2, ceiling)
	}
}

// txtNotVisibleError: the broker accepted the challenge, but its TXT record
// did not show through the resolver in time.
type txtNotVisibleError struct {
	name    string
	timeout time.Duration
	last    error // what the last lookup found
}

func (e *txtNotVisibleError) Error() string {
	return fmt.Sprintf("TXT record %s not visible after %v (last lookup: %v): the broker accepted the challenge but its DNS does not show it; is the resolver able to reach the forge's DNS?", e.name, e.timeout, e.last)
}

// CleanUp does nothing: the broker keeps one value per peer and overwrites
// it at the next registration; it expires by itself after an hour.
func (s *dns01Solver) CleanUp(context.Context, acme.Challenge) error { return nil }
