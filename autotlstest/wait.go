package autotlstest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/fx"

	"github.com/p2ptls/autotls"
)

// record is what a host built with HostOptions reported since it started.
// EvtIssuanceFailed is not stateful: a subscriber made after libp2p.New
// could miss the first failures, so the subscription is made in the
// host's construction.
type record struct {
	mu       sync.Mutex
	failures []autotls.EvtIssuanceFailed
	seen     int           // failures already returned by WaitIssuanceFailed
	more     chan struct{} // closed and replaced on every event
}

func newRecord() *record { return &record{more: make(chan struct{})} }

func (r *record) add(e autotls.EvtIssuanceFailed) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failures = append(r.failures, e)
	close(r.more)
	r.more = make(chan struct{})
}

// state returns the last failure (ok false if none) and a channel closed
// at the next event.
func (r *record) state() (last autotls.EvtIssuanceFailed, ok bool, more <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if n := len(r.failures); n > 0 {
		last, ok = r.failures[n-1], true
	}
	return last, ok, r.more
}

// recordOption subscribes a record to the host's bus before the host
// starts, and registers the host to be closed with the test.
func (f *Forge) recordOption() libp2p.Option {
	return libp2p.WithFxOption(fx.Invoke(func(h host.Host, lc fx.Lifecycle) error {
		sub, err := h.EventBus().Subscribe(new(autotls.EvtIssuanceFailed), eventbus.BufSize(256))
		if err != nil {
			return err
		}
		r := newRecord()
		done := make(chan struct{})
		go func() {
			defer close(done)
			for e := range sub.Out() {
				r.add(e.(autotls.EvtIssuanceFailed))
			}
		}()
		f.mu.Lock()
		f.hosts[h.ID()] = r
		f.open[r] = h
		f.mu.Unlock()
		lc.Append(fx.StopHook(func() {
			_ = sub.Close()
			<-done
			f.mu.Lock()
			delete(f.open, r)
			f.mu.Unlock()
		}))
		return nil
	}))
}

// closeHosts closes the hosts built with HostOptions that are still open:
// as libp2p.New returned them if they were given to a Wait method (which
// stops everything the host runs), else as the fx graph holds them (which
// stops their network only: the test should close them).
func (f *Forge) closeHosts() {
	f.mu.Lock()
	var hs []host.Host
	for _, h := range f.open {
		hs = append(hs, h)
	}
	f.mu.Unlock()
	for _, h := range hs {
		_ = h.Close()
	}
}

// recordOf returns the record of a host built with HostOptions, or one
// subscribed now (which misses the failures before now), with a function
// that ends its subscription.
func (f *Forge) recordOf(tb testing.TB, h host.Host) (*record, func()) {
	tb.Helper()
	f.mu.Lock()
	r := f.hosts[h.ID()]
	if _, open := f.open[r]; r != nil && open {
		// h is the host libp2p.New returned: its Close stops all of it,
		// autotls included, where the one fx gave recordOption stops
		// only the network.
		f.open[r] = h
	}
	f.mu.Unlock()
	if r != nil {
		return r, func() {}
	}
	sub, err := h.EventBus().Subscribe(new(autotls.EvtIssuanceFailed), eventbus.BufSize(256))
	if err != nil {
		tb.Fatalf("autotlstest: subscribing to the host's events: %v", err)
	}
	r = newRecord()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for e := range sub.Out() {
			r.add(e.(autotls.EvtIssuanceFailed))
		}
	}()
	return r, func() { _ = sub.Close(); <-done }
}

// WaitBrowserAddr waits until h announces an address that a browser can
// dial, /ipX/.../tls/sni/<ip>.<peerid>.<forge>/ws (or the /dnsX/.../tls/ws
// form with autotls.WithShortAddrs), and returns it. If none comes within
// the wait's bound ([WithWaitTimeout]), it fails tb with the host's
// autotls status (what its certificate manager is doing or waits for, and
// when it tries next, as autotls.Status.String says it) and the cause and
// attempt of the last autotls.EvtIssuanceFailed the host reported. Hosts
// built without [Forge.HostOptions] report only the failures after the
// call.
func (f *Forge) WaitBrowserAddr(tb testing.TB, h host.Host) ma.Multiaddr {
	tb.Helper()
	return f.waitAddr(tb, h, "browser address", f.isBrowserAddr, func() string { return "" })
}

// waitAddr waits until h announces an address match accepts, and returns
// the first, preferring IPv4. If none comes within the wait's bound, it
// fails tb: h announced no <what>, hint(), then why.
func (f *Forge) waitAddr(tb testing.TB, h host.Host, what string, match func(ma.Multiaddr) bool, hint func() string) ma.Multiaddr {
	tb.Helper()
	r, stop := f.recordOf(tb, h)
	defer stop()
	sub, err := h.EventBus().Subscribe(new(event.EvtLocalAddressesUpdated))
	if err != nil {
		tb.Fatalf("autotlstest: subscribing to the host's events: %v", err)
	}
	defer sub.Close()
	ctx, cancel := context.WithTimeout(context.Background(), f.waitTimeout)
	defer cancel()
	for {
		if a := f.firstAddr(h, match); a != nil {
			return a
		}
		_, _, more := r.state()
		select {
		case <-sub.Out():
		case <-more:
		case <-time.After(100 * time.Millisecond):
			// The address factory's result is read here again in case an
			// update was coalesced.
		case <-ctx.Done():
			tb.Fatalf("autotlstest: host %s announced no %s within %v%s; %s; its addresses: %v",
				h.ID(), what, f.waitTimeout, hint(), why(h, r), h.Addrs())
			return nil
		}
	}
}

// why says why h has no certificate, or what it is doing: its autotls
// status and its last issuance failure's error.
func why(h host.Host, r *record) string {
	status, ok := statusLine(h)
	last, failed, _ := r.state()
	switch {
	case !failed:
		return status + "; no issuance failure reported"
	case ok: // the status has the failure's time and sentence
		return fmt.Sprintf("%s; last issuance failure (attempt %d): %v", status, last.Attempt, last.Err)
	default:
		return fmt.Sprintf("%s; last issuance failure (attempt %d, next retry %s): %v",
			status, last.Attempt, last.NextRetry.Format(time.RFC3339), last.Err)
	}
}

// statusTimeout bounds the read of a host's autotls status when a wait
// fails; a host built with autotls.Option has it at hand at once.
const statusTimeout = time.Second

// statusLine returns "autotls status: " and h's status in one line; ok
// false if h has none.
func statusLine(h host.Host) (line string, ok bool) {
	ctx, cancel := context.WithTimeout(context.Background(), statusTimeout)
	defer cancel()
	s, err := autotls.StatusOf(ctx, h)
	if err != nil {
		return fmt.Sprintf("no autotls status within %v (is the host built with autotls.Option?)", statusTimeout), false
	}
	return "autotls status: " + s.String(), true
}

// WaitIssuanceFailed waits for the next autotls.EvtIssuanceFailed of h,
// one not returned by an earlier call, and returns it; it fails tb if none
// comes within the wait's bound ([WithWaitTimeout]). For a host built with
// [Forge.HostOptions], failures are recorded from its start, so the first
// call returns the first failure even if it came before the call.
func (f *Forge) WaitIssuanceFailed(tb testing.TB, h host.Host) autotls.EvtIssuanceFailed {
	tb.Helper()
	r, stop := f.recordOf(tb, h)
	defer stop()
	timeout := time.NewTimer(f.waitTimeout)
	defer timeout.Stop()
	for {
		r.mu.Lock()
		if r.seen < len(r.failures) {
			e := r.failures[r.seen]
			r.seen++
			r.mu.Unlock()
			return e
		}
		more := r.more
		r.mu.Unlock()
		select {
		case <-more:
		case <-timeout.C:
			tb.Fatalf("autotlstest: host %s reported no new issuance failure within %v", h.ID(), f.waitTimeout)
			return autotls.EvtIssuanceFailed{}
		}
	}
}

// firstAddr returns h's first announced address that match accepts,
// preferring IPv4; nil if none.
func (f *Forge) firstAddr(h host.Host, match func(ma.Multiaddr) bool) ma.Multiaddr {
	var found ma.Multiaddr
	for _, a := range h.Addrs() {
		if !match(a) {
			continue
		}
		if _, err := a.ValueForProtocol(ma.P_IP6); err != nil {
			return a // IPv4 or DNS
		}
		if found == nil {
			found = a
		}
	}
	return found
}

// isBrowserAddr reports whether a is a /tls/.../ws address whose name
// (SNI or DNS) is a concrete name under the forge's domain.
func (f *Forge) isBrowserAddr(a ma.Multiaddr) bool {
	for _, c := range a {
		if c.Code() == ma.P_WS {
			return f.isForgeTLSAddr(a)
		}
	}
	return false
}

// isForgeTLSAddr reports whether a has /tls and a name (SNI or DNS) that
// is a concrete name under the forge's domain.
func (f *Forge) isForgeTLSAddr(a ma.Multiaddr) bool {
	var name string
	var tls bool
	for _, c := range a {
		switch c.Code() {
		case ma.P_SNI, ma.P_DNS, ma.P_DNS4, ma.P_DNS6:
			name = c.Value()
		case ma.P_TLS:
			tls = true
		}
	}
	return tls && f.isForgeName(name)
}

// isForgeName reports whether name is a concrete name under the forge's
// domain (no wildcard).
func (f *Forge) isForgeName(name string) bool {
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	return !strings.HasPrefix(name, "*") && strings.HasSuffix(name, "."+f.f.Domain)
}
