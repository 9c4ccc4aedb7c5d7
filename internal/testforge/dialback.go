package testforge

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
	ma "github.com/multiformats/go-multiaddr"
)

// dialBack proves that id is reachable at one of addrs, as the public broker
// does (protocol §2.5): a fresh host dials {id, addrs}; success means a
// secured connection to id on any address. Identify is awaited briefly but
// its failure is not fatal. The returned error's text is what the broker
// puts after "error testing addresses: ".
func (f *Forge) dialBack(ctx context.Context, id peer.ID, addrs []string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(f.ctx, cancel)() // Close aborts the probe
	f.dialedMu.Lock()
	f.dialed = append(f.dialed, slices.Clone(addrs))
	f.dialedMu.Unlock()

	if fn := f.dialFault.Load(); fn != nil {
		if err := (*fn)(id, addrs); err != nil {
			return err
		}
	}

	h, err := libp2p.New(f.dialBackOptions()...)
	if err != nil {
		return err
	}
	defer func() { _ = h.Close() }()

	maddrs := make([]ma.Multiaddr, 0, len(addrs))
	for _, s := range addrs {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return err
		}
		maddrs = append(maddrs, a)
	}

	h.Peerstore().AddAddrs(id, maddrs, peerstore.TempAddrTTL)
	conn, err := h.Network().DialPeer(ctx, id)
	if err != nil {
		return fmt.Errorf("failed to dial: %w", err)
	}

	if ids, ok := h.(interface{ IDService() identify.IDService }); ok {
		t := time.NewTimer(identifyTimeout)
		defer t.Stop()
		select {
		case <-ids.IDService().IdentifyWait(conn):
		case <-t.C:
		case <-ctx.Done():
		}
	}
	return nil
}

// DialBackAddrs returns the addresses the broker was asked to dial back,
// one list per dial-back (authenticated, well-formed registrations), in
// order.
func (f *Forge) DialBackAddrs() [][]string {
	f.dialedMu.Lock()
	defer f.dialedMu.Unlock()
	out := make([][]string, len(f.dialed))
	for i, a := range f.dialed {
		out[i] = slices.Clone(a)
	}
	return out
}

// SetDialBackFault installs fn, called before each dial-back with the peer
// and the addresses it sent. A non-nil error fails the dial-back as an
// unreachable host would: the broker answers 400 "error testing addresses:
// <err>", as the public broker does. Nil removes the hook.
func (f *Forge) SetDialBackFault(fn func(id peer.ID, addrs []string) error) {
	if fn == nil {
		f.dialFault.Store(nil)
		return
	}
	f.dialFault.Store(&fn)
}
