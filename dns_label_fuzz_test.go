package autotls

// Fuzz targets of the label and address code.

import (
	"net/netip"
	"strings"
	"testing"

	ma "github.com/multiformats/go-multiaddr"
)

func FuzzParseIPLabel(f *testing.F) {
	for _, s := range []string{
		"203-0-113-7", "0-0-0-0", "255-255-255-255", "2001-db8--1", "0--1", "2001-db8--0", "0--0",
		"01-2-3-4", "1-2-3", "256-1-1-1", "foo", "--1", "2001-db8--", "fe80--1%eth0",
		"0--ffff-cb00-7107", "2001-db8-0-0-0-0-0-1", "1-2--3", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, label string) {
		ip, err := parseIPLabel(label)
		if err != nil {
			return
		}
		if ip.Zone() != "" || ip.Is4In6() || len(label) > maxIPLabel {
			t.Fatalf("parseIPLabel(%q) accepted %v", label, ip)
		}
		back, err := ipLabel(ip)
		if err != nil || back != label {
			t.Fatalf("ipLabel(parseIPLabel(%q)) = %q, %v", label, back, err)
		}
	})
}

func FuzzIPLabel(f *testing.F) {
	f.Add([]byte{203, 0, 113, 7})
	f.Add(make([]byte, 16))
	f.Add(netip.MustParseAddr("2001:db8::1").AsSlice())
	f.Add(netip.MustParseAddr("::ffff:1.2.3.4").AsSlice())
	f.Fuzz(func(t *testing.T, b []byte) {
		ip, ok := netip.AddrFromSlice(b)
		if !ok {
			return
		}
		l, err := ipLabel(ip)
		if err != nil {
			if !ip.Is4In6() {
				t.Fatalf("ipLabel(%v): %v", ip, err)
			}
			return
		}
		if err := checkHostLabel(l); err != nil {
			t.Fatalf("ipLabel(%v) = %q: %v", ip, l, err)
		}
		back, err := parseIPLabel(l)
		if err != nil || back != ip {
			t.Fatalf("parseIPLabel(ipLabel(%v) = %q) = %v, %v", ip, l, back, err)
		}
	})
}

func FuzzParsePeerIDLabel(f *testing.F) {
	for _, s := range []string{
		vectorLabel, strings.ToUpper(vectorLabel), vectorPeerID, "k", "k51", "kzwfwj", "bafzaa", "",
		// secp256k1, RSA and ECDSA labels of TestPeerIDLabelKeyTypes' keys.
		"kzwfwjn5ji4pulqsqqobegnob3x0r1grl1jkzy7knrrvl3equku4nzbjlzql54n",
		"k2k4r8k9q4ahwbttuepllmqdhfbgjxanmx9d915zlm4metwuk8wvp41p",
		"k2k4r8oprbpx5i2m7te8fmw7v7x8k2n444z7bteu7cwzvolnvv85fwlr",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, label string) {
		id, err := parsePeerIDLabel(label)
		if err != nil {
			return
		}
		if err := id.Validate(); err != nil {
			t.Fatalf("parsePeerIDLabel(%q) returned an invalid ID: %v", label, err)
		}
		if back := peerIDLabel(id); back != strings.ToLower(label) {
			t.Fatalf("peerIDLabel(parsePeerIDLabel(%q)) = %q", label, back)
		}
	})
}

func FuzzNormalizeForgeDomain(f *testing.F) {
	for _, s := range []string{
		"libp2p.direct", "LibP2P.Direct.", "a.b", "localhost", "", ".", "a..b", "-a.b", "a-.b", "1.2",
		"xn--bcher-kva.example", strings.Repeat("a", 63) + ".com", strings.Repeat("a.", 80) + "com",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		d, err := normalizeForgeDomain(in)
		if err != nil {
			return
		}
		if d != strings.ToLower(strings.TrimSuffix(in, ".")) {
			t.Fatalf("normalizeForgeDomain(%q) = %q: more than lower-casing and one dot", in, d)
		}
		if again, err := normalizeForgeDomain(d); err != nil || again != d {
			t.Fatalf("normalizeForgeDomain is not idempotent on %q: %q, %v", d, again, err)
		}
		longest := strings.Repeat("f", maxIPLabel) + "." + strings.Repeat("k", maxDNSLabel) + "." + d
		if len(longest) > maxDNSName {
			t.Fatalf("forge %q leaves no room: %d characters", d, len(longest))
		}
		for _, l := range strings.Split(d, ".") {
			if err := checkHostLabel(l); err != nil {
				t.Fatalf("normalizeForgeDomain(%q) = %q: %v", in, d, err)
			}
		}
	})
}

func FuzzParseForgeAddr(f *testing.F) {
	id := vectorID(f)
	for _, s := range []string{
		"/ip4/203.0.113.7/tcp/4001/tls/sni/*.libp2p.direct/ws",
		"/ip6/2001:db8::1/tcp/443/tls/sni/*.libp2p.direct/ws",
	} {
		for _, short := range []bool{false, true} {
			a, ok := forgeAddr(ma.StringCast(s), id, testForge, short)
			if !ok {
				f.Fatalf("forgeAddr(%s) not ok", s)
			}
			f.Add(a.Bytes())
			f.Add(ma.StringCast(a.String() + "/p2p/" + vectorPeerID).Bytes())
		}
	}
	for _, s := range []string{
		"/ip4/1.2.3.4/tcp/1/tls/sni/5-6-7-8." + vectorLabel + ".libp2p.direct/ws",
		"/dns6/1-2-3-4." + vectorLabel + ".LIBP2P.direct/tcp/1/tls/ws",
		"/ip4/1.2.3.4/tcp/1/tls/sni/*.libp2p.direct/ws",
		"/ip4/1.2.3.4/tcp/1",
	} {
		f.Add(ma.StringCast(s).Bytes())
	}
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := ma.NewMultiaddrBytes(b)
		if err != nil {
			return
		}
		ip, port, pid, err := parseForgeAddr(a, testForge)
		if err != nil {
			return
		}
		if n := len(a); a[n-1].Code() == ma.P_P2P {
			a = a[:n-1]
		}
		short := a[0].Code() == ma.P_DNS4 || a[0].Code() == ma.P_DNS6
		again, ok := forgeAddr(listenAddrFor(t, ip, port, testForge), pid, testForge, short)
		if !ok {
			t.Fatalf("forgeAddr refused what parseForgeAddr accepted: %s", a)
		}
		if !strings.EqualFold(again.String(), a.String()) {
			t.Fatalf("%s re-renders as %s", a, again)
		}
	})
}
