package netsim_test

// Renewal in the simulated internet: reachability lost, and regained,
// around the time a short-lived certificate is due for renewal.

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// runReturnsBeforeLapse: as runLostBeforeRenewal, but TCP opens again while
// the renewal waits and the certificate is still valid: the host (restarted,
// for the reason given there) renews it before it lapses.
func runReturnsBeforeLapse(t *testing.T) {
	tc := topology{name: "reachability-returns-before-lapse", autoNATv2: true, externalIP: "5.100.0.2"}
	const validity = 90 * time.Second // renewal due at about 45-60 s
	s := buildSim(t, tc, validity)
	state := t.TempDir()

	a, id := s.startHost(t, tc, state)
	first, _ := a.await(0, 90*time.Second, "certificate", ev("cert"))
	a.stop()

	firewallTCP(s.n, s.host)
	b, _ := s.startHost(t, tc, state)
	b.await(0, 30*time.Second, "the stored certificate", func(m msg) bool { return m.Ev == "cert" && m.Source == "storage" })
	b.await(0, 90*time.Second, "the renewal waiting for reachability", func(m msg) bool {
		return m.Ev == "log" && m.Level == "WARN" && strings.Contains(m.Text, "certificate renewal waits")
	})
	if slices.ContainsFunc(b.lines(), func(m msg) bool { return m.Ev == "cert" && m.Source != "storage" }) {
		t.Fatalf("%s: the host renewed while TCP was firewalled:\n%s", tc.name, b.dump())
	}
	b.stop()

	s.n.Nft(s.host, "delete table inet fw\n")
	c, _ := s.startHost(t, tc, state)
	renewed, _ := c.await(0, 60*time.Second, "the renewal", func(m msg) bool {
		return m.Ev == "expired" || (m.Ev == "cert" && m.Source != "storage")
	})
	if renewed.Ev != "cert" || renewed.Source != "renewed" {
		t.Fatalf("%s: after TCP opened again the host got %+v, want a renewal before %s", tc.name, renewed, first.Text)
	}
	s.dial(t, c, 0, id, tc.externalIP)
	t.Logf("%s: renewed %.1f s after the restart with TCP open: %s", tc.name, float64(renewed.MS)/1000, renewed.Text)
}

// runLostBeforeRenewal: a public host gets a certificate; then its TCP port
// is firewalled (QUIC stays open) and it restarts with the stored
// certificate and identity. It must keep serving that certificate until it
// lapses without asking the broker or the CA at renewal time; once TCP is
// open again it gets a new one, dialled over WSS.
//
// The host restarts at each change because go-libp2p's AutoNAT v2 client
// re-checks an address it is confident about only after an hour
// (highConfidenceAddrProbeInterval), and v1 after 15 minutes: a running host
// would not notice the change within a test. A restart starts AutoNAT
// afresh while the certificate comes from storage, as it would for a node
// restarted after its firewall changed.
func runLostBeforeRenewal(t *testing.T) {
	tc := topology{name: "reachability-lost-before-renewal", autoNATv2: true, externalIP: "5.100.0.2"}
	const validity = 60 * time.Second // renewal due at about 30-40 s
	s := buildSim(t, tc, validity)
	state := t.TempDir()

	a, id := s.startHost(t, tc, state)
	first, _ := a.await(0, 90*time.Second, "certificate", ev("cert"))
	s.dial(t, a, 0, id, tc.externalIP)
	a.stop()
	t.Logf("%s: first certificate at %.1f s: %s", tc.name, float64(first.MS)/1000, first.Text)

	firewallTCP(s.n, s.host)
	before := s.stats(t)
	b, _ := s.startHost(t, tc, state)
	loaded, _ := b.await(0, 30*time.Second, "the stored certificate", ev("cert"))
	if loaded.Source != "storage" || loaded.Text != first.Text {
		t.Fatalf("after the restart the host loaded %q from %s, want %q from storage", loaded.Text, loaded.Source, first.Text)
	}
	b.await(0, 90*time.Second, "the gate finding the TCP address unreachable", reach("unreachable"))
	expired, i := b.await(0, validity+30*time.Second, "the certificate lapsing", func(m msg) bool {
		return m.Ev == "expired" || (m.Ev == "cert" && m.Source != "storage")
	})
	switch {
	case expired.Ev != "expired":
		t.Errorf("%s: the host replaced its certificate while TCP was firewalled: %+v", tc.name, expired)
	case !strings.Contains(first.Text, expired.Text):
		t.Errorf("%s: the certificate lapsed at %s, want the first one's NotAfter (%s)", tc.name, expired.Text, first.Text)
	default:
		t.Logf("%s: certificate kept until it lapsed, %.1f s after the restart", tc.name, float64(b.lines()[i].MS)/1000)
	}
	wantLog(t, b, "WARN", "certificate renewal waits")
	if after := s.stats(t); after.Health != before.Health || after.Challenge != before.Challenge || after.CA != before.CA {
		t.Errorf("%s: the host contacted the forge while its TCP port was firewalled: before %+v, after %+v\nhost lines:\n%s", tc.name, before, after, b.dump())
	}
	b.stop()

	s.n.Nft(s.host, "delete table inet fw\n")
	c, _ := s.startHost(t, tc, state)
	renewed, _ := c.await(0, 90*time.Second, "a new certificate", func(m msg) bool { return m.Ev == "cert" && m.Source != "storage" })
	s.dial(t, c, 0, id, tc.externalIP)
	logTimings(t, tc, c, renewed.MS)
}
