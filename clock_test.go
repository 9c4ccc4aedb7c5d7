package autotls

import (
	"slices"
	"sync"
	"testing"
	"time"
)

// fakeClock is the manager's clock in tests. Time stands still until the
// manager waits; a wait then ends at once and the clock jumps to its end,
// so a day of backoff passes in as long as the requests in it take. Waits
// that would end after the horizon do not: they park until the horizon is
// moved past them (or are stopped), which lets a test stop the simulated
// time at a point of its choosing, look around, and resume.
//
// Every wait asked for is recorded, so a test can assert the manager's
// backoff (a lower bound, never a speed).
//
// A wait within the horizon is over as soon as it starts: something the
// manager selects on alongside it (a kick) should be sent while the
// manager is parked, or it races a timer that has already fired.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	horizon time.Time
	parked  []*fakeTimer
	waits   []time.Duration
	// parkc receives (without blocking) each time a wait parks.
	parkc chan struct{}
}

type fakeTimer struct {
	at time.Time
	c  chan time.Time
}

var _ clock = (*fakeClock)(nil)

// farFuture is a horizon that is never reached.
var farFuture = time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)

// newFakeClock returns a clock that reads start and has no horizon.
func newFakeClock(start time.Time) *fakeClock {
	return &fakeClock{now: start, horizon: farFuture, parkc: make(chan struct{}, 1)}
}

func withClock(c clock) Opt {
	return func(cfg *config) error { cfg.clock = c; return nil }
}

// Now implements clock.
func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// NewTimer implements clock: a wait that ends by the horizon fires at
// once, moving the clock to its end; a later one parks.
func (c *fakeClock) NewTimer(d time.Duration) (<-chan time.Time, func() bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.waits = append(c.waits, d)
	t := &fakeTimer{at: c.now.Add(max(d, 0)), c: make(chan time.Time, 1)}
	if !t.at.After(c.horizon) {
		c.now = t.at
		t.c <- t.at
		return t.c, func() bool { return false }
	}
	c.parked = append(c.parked, t)
	select {
	case c.parkc <- struct{}{}:
	default:
	}
	return t.c, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		n := len(c.parked)
		c.parked = slices.DeleteFunc(c.parked, func(p *fakeTimer) bool { return p == t })
		return len(c.parked) < n
	}
}

// SetHorizon moves the horizon to h and fires, in order, the parked waits
// that end by it, moving the clock to the end of each.
func (c *fakeClock) SetHorizon(h time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.horizon = h
	slices.SortFunc(c.parked, func(a, b *fakeTimer) int { return a.at.Compare(b.at) })
	for len(c.parked) > 0 && !c.parked[0].at.After(h) {
		t := c.parked[0]
		c.parked = c.parked[1:]
		if t.at.After(c.now) {
			c.now = t.at
		}
		t.c <- t.at
	}
}

// Waits returns every wait asked for so far, in order.
func (c *fakeClock) Waits() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.waits)
}

// WaitParked blocks until a wait is parked at the horizon (the manager is
// idle until the horizon moves), failing the test after timeout.
func (c *fakeClock) WaitParked(t testing.TB, timeout time.Duration) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		n := len(c.parked)
		c.mu.Unlock()
		if n > 0 {
			return
		}
		select {
		case <-c.parkc:
		case <-deadline.C:
			t.Fatalf("the manager did not come to wait past the horizon within %v (clock at %v)", timeout, c.Now())
		}
	}
}

func TestFakeClock(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := newFakeClock(start)
	ch, _ := c.NewTimer(time.Hour)
	if got := <-ch; !got.Equal(start.Add(time.Hour)) || !c.Now().Equal(got) {
		t.Fatalf("a wait within the horizon fired at %v, clock %v; want both %v", got, c.Now(), start.Add(time.Hour))
	}

	c.SetHorizon(start.Add(2 * time.Hour))
	ch, stop := c.NewTimer(3 * time.Hour)
	select {
	case <-ch:
		t.Fatal("a wait past the horizon fired")
	default:
	}
	c.WaitParked(t, time.Second)
	if !stop() {
		t.Fatal("stopping a parked wait reported it had fired")
	}
	c.SetHorizon(farFuture)
	select {
	case <-ch:
		t.Fatal("a stopped wait fired")
	default:
	}

	c.SetHorizon(start.Add(2 * time.Hour))
	ch, _ = c.NewTimer(90 * time.Minute)
	c.SetHorizon(start.Add(4 * time.Hour))
	if got := <-ch; !got.Equal(start.Add(150*time.Minute)) || !c.Now().Equal(got) {
		t.Fatalf("a parked wait fired at %v (clock %v), want %v", got, c.Now(), start.Add(150*time.Minute))
	}
	if w := c.Waits(); !slices.Equal(w, []time.Duration{time.Hour, 3 * time.Hour, 90 * time.Minute}) {
		t.Fatalf("waits = %v", w)
	}
}
