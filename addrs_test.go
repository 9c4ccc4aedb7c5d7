package autotls

import (
	"crypto/x509"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// TestRewriteAddrs covers the address factory's rules: forge listen
// addresses become browser addresses only while a valid certificate is
// loaded, only public ones unless private ones are allowed, never one whose
// TCP part AutoNAT v2 found unreachable; everything else passes through.
func TestRewriteAddrs(t *testing.T) {
	t.Parallel()
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := peer.IDFromPrivateKey(k)
	label := peerIDLabel(id)
	const forge = "libp2p.direct"
	public := ma.StringCast("/ip4/1.2.3.4/tcp/4001/tls/sni/*.libp2p.direct/ws")
	public6 := ma.StringCast("/ip6/2606:4700::1/tcp/4001/tls/sni/*.libp2p.direct/ws")
	private := ma.StringCast("/ip4/192.168.1.2/tcp/4001/tls/sni/*.libp2p.direct/ws")
	plainTCP := ma.StringCast("/ip4/1.2.3.4/tcp/4001")
	relay := ma.StringCast("/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq/p2p-circuit")
	otherForge := ma.StringCast("/ip4/1.2.3.4/tcp/4001/tls/sni/*.example.net/ws")
	in := []ma.Multiaddr{public, public6, private, plainTCP, relay, otherForge}

	long4 := "/ip4/1.2.3.4/tcp/4001/tls/sni/1-2-3-4." + label + ".libp2p.direct/ws"
	long6 := "/ip6/2606:4700::1/tcp/4001/tls/sni/2606-4700--1." + label + ".libp2p.direct/ws"
	longPriv := "/ip4/192.168.1.2/tcp/4001/tls/sni/192-168-1-2." + label + ".libp2p.direct/ws"
	short4 := "/dns4/1-2-3-4." + label + ".libp2p.direct/tcp/4001/tls/ws"
	passthrough := []string{plainTCP.String(), relay.String(), otherForge.String()}

	for _, tc := range []struct {
		name         string
		cert         bool
		expired      bool
		allowPrivate bool
		short        bool
		unreachable  []ma.Multiaddr
		want         []string
	}{
		{name: "no certificate", want: passthrough},
		{name: "expired certificate", cert: true, expired: true, want: passthrough},
		{name: "public only", cert: true, want: append([]string{long4, long6}, passthrough...)},
		{name: "private allowed", cert: true, allowPrivate: true, want: append([]string{long4, long6, longPriv}, passthrough...)},
		{name: "short form", cert: true, short: true, want: append([]string{short4, "/dns6/2606-4700--1." + label + ".libp2p.direct/tcp/4001/tls/ws"}, passthrough...)},
		{name: "unreachable tcp dropped", cert: true, unreachable: []ma.Multiaddr{plainTCP}, want: append([]string{long6}, passthrough...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &config{forgeDomain: forge, allowPrivate: tc.allowPrivate, shortAddrs: tc.short, clock: realClock{}}
			m := newManager(c)
			m.id = id
			m.reach.unreachable = tc.unreachable
			if tc.cert {
				na := time.Now().Add(time.Hour)
				if tc.expired {
					na = time.Now().Add(-time.Hour)
				}
				m.cert.Store(&servedCert{leaf: &x509.Certificate{NotAfter: na}})
			}
			var got []string
			for _, a := range m.rewriteAddrs(in) {
				got = append(got, a.String())
			}
			slices.Sort(got)
			want := slices.Clone(tc.want)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Fatalf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
			}
		})
	}
}
