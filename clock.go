package autotls

import (
	"context"
	"time"
)

// clock is the one time source of a manager: every "now" and every wait,
// from the run loop's backoff to the polls of an ACME order, the TXT check,
// a Retry-After and ARI. Production uses the real one; tests inject a fake
// one to run a day of retries in a moment.
type clock interface {
	Now() time.Time
	// NewTimer returns a channel that receives once d has passed, and a
	// function that stops the timer.
	NewTimer(d time.Duration) (<-chan time.Time, func() bool)
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) NewTimer(d time.Duration) (<-chan time.Time, func() bool) {
	t := time.NewTimer(d)
	return t.C, t.Stop
}

// sleep waits d on clk. It returns ctx's error if ctx ends first.
func sleep(ctx context.Context, clk clock, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	c, stop := clk.NewTimer(d)
	defer stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-c:
		return nil
	}
}
