package autotlstest

import (
	"context"
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
// the wait's bound ([WithWaitTimeout]), it fails tb with the last
// autotls.EvtIssuanceFailed the host reported: its cause, attempt and next
// retry. Hosts built without [Forge.HostOptions] report only the failures
// after the call.
func (f *Forge) WaitBrowserAddr(tb testing.TB, h host.Host) ma.Multiaddr {
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
		if a := f.browserAddr(h); a != nil {
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
			last, ok, _ := r.state()
			if !ok {
				tb.Fatalf("autotlstest: host %s announced no browser address within %v and reported no issuance failure; its addresses: %v", h.ID(), f.waitTimeout, h.Addrs())
			}
			tb.Fatalf("autotlstest: host %s announced no browser address within %v; its last issuance failure (attempt %d, next retry %s): %v",
				h.ID(), f.waitTimeout, last.Attempt, last.NextRetry.Format(time.RFC3339), last.Err)
			return nil
		}
	}
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

// browserAddr returns h's first announced address that a browser can
// dial under the forge's domain, preferring IPv4; nil if none.
func (f *Forge) browserAddr(h host.Host) ma.Multiaddr {
	var found ma.Multiaddr
	for _, a := range h.Addrs() {
		if !f.isBrowserAddr(a) {
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
	var name string
	var tls, ws bool
	for _, c := range a {
		switch c.Code() {
		case ma.P_SNI, ma.P_DNS, ma.P_DNS4, ma.P_DNS6:
			name = c.Value()
		case ma.P_TLS:
			tls = true
		case ma.P_WS:
			ws = true
		}
	}
	return tls && ws && !strings.HasPrefix(name, "*") && strings.HasSuffix(name, "."+f.f.Domain)
}
