package autotls

// The inverses of dns_label.go's encoders: what a dialer or the forge's
// DNS does with our names. Only the tests (round trips, fuzzing) need them.

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/multiformats/go-multibase"
	mh "github.com/multiformats/go-multihash"
)

// parsePeerIDLabel is the inverse of [peerIDLabel]. It ignores case (DNS
// does), and rejects a label that is longer than a DNS label, not base36,
// not a CIDv1 with codec libp2p-key, or whose multihash is not a PeerID's
// (an identity hash of a valid public key, or a full SHA-256 digest).
func parsePeerIDLabel(label string) (peer.ID, error) {
	if len(label) > maxDNSLabel {
		return "", fmt.Errorf("peer label is %d characters, longer than a DNS label", len(label))
	}
	label = strings.ToLower(label)
	if len(label) < 2 || label[0] != byte(multibase.Base36) {
		return "", fmt.Errorf("peer label %q is not base36 (does not start with %q)", label, multibase.Base36)
	}
	c, err := cid.Decode(label)
	if err != nil {
		return "", fmt.Errorf("decoding peer label %q: %w", label, err)
	}
	p := c.Prefix()
	if p.Version != 1 || p.Codec != cid.Libp2pKey {
		return "", fmt.Errorf("peer label %q is not a CIDv1 of a libp2p key (version %d, codec %#x)", label, p.Version, p.Codec)
	}
	id, err := peer.FromCid(c)
	if err != nil {
		return "", fmt.Errorf("decoding peer label %q: %w", label, err)
	}
	switch p.MhType {
	case mh.IDENTITY:
		if _, err := id.ExtractPublicKey(); err != nil {
			return "", fmt.Errorf("peer label %q: inline public key: %w", label, err)
		}
	case mh.SHA2_256:
		if p.MhLength != 32 {
			return "", fmt.Errorf("peer label %q: truncated sha2-256 digest (%d bytes)", label, p.MhLength)
		}
	default:
		return "", fmt.Errorf("peer label %q: multihash %#x is neither identity nor sha2-256", label, p.MhType)
	}
	return id, nil
}

// parseIPLabel is the strict inverse of [ipLabel]: it accepts exactly the
// labels ipLabel emits. An IPv4 label is four decimal octets without leading
// zeros; an IPv6 label is read with '-' replaced by ':' and must be in the
// canonical form (lower case, RFC 5952 compression, "0"-padded at the ends).
// The forge's DNS server is more lenient (it also takes "--1" and expanded
// IPv6); we parse only what a conforming client announces. Zones, dots,
// IPv4-mapped IPv6 and labels without '-' are refused.
func parseIPLabel(label string) (netip.Addr, error) {
	if !strings.Contains(label, "-") {
		return netip.Addr{}, fmt.Errorf("IP label %q has no '-'", label)
	}
	for i := 0; i < len(label); i++ {
		c := label[i]
		if !('0' <= c && c <= '9') && !('a' <= c && c <= 'f') && c != '-' {
			return netip.Addr{}, fmt.Errorf("IP label %q has character %q outside [0-9a-f-]", label, c)
		}
	}
	ip, err := netip.ParseAddr(strings.ReplaceAll(label, "-", "."))
	if err != nil || !ip.Is4() {
		ip, err = netip.ParseAddr(strings.ReplaceAll(label, "-", ":"))
		if err != nil || !ip.Is6() {
			return netip.Addr{}, fmt.Errorf("IP label %q is neither an IPv4 nor an IPv6 address", label)
		}
	}
	want, err := ipLabel(ip)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("IP label %q: %w", label, err)
	}
	if want != label {
		return netip.Addr{}, fmt.Errorf("IP label %q is not canonical (want %q)", label, want)
	}
	return ip, nil
}

// parseForgeAddr parses either announced form of [forgeAddr] back (a
// trailing /p2p component is ignored) and checks that it belongs to forge:
// the name must be exactly "<ip label>.<peer label>.<forge>" (any case), the
// IP label must match the /ipX component (long form) or the /dns4|dns6
// family (short form), and the IP must not be unspecified.
func parseForgeAddr(a ma.Multiaddr, forge string) (ip netip.Addr, port uint16, id peer.ID, err error) {
	forge, err = normalizeForgeDomain(forge)
	if err != nil {
		return netip.Addr{}, 0, "", err
	}
	if n := len(a); n > 0 && a[n-1].Code() == ma.P_P2P {
		a = a[:n-1]
	}
	var host string
	switch {
	case len(a) == 5 && isIPTCP(a[:2]) && a[2].Code() == ma.P_TLS && a[3].Code() == ma.P_SNI && a[4].Code() == ma.P_WS:
		host = a[3].Value()
	case len(a) == 4 && (a[0].Code() == ma.P_DNS4 || a[0].Code() == ma.P_DNS6) &&
		a[1].Code() == ma.P_TCP && a[2].Code() == ma.P_TLS && a[3].Code() == ma.P_WS:
		host = a[0].Value()
	default:
		return netip.Addr{}, 0, "", fmt.Errorf("address %s is not a forge address", a)
	}
	ip, id, err = parseForgeHost(host, forge)
	if err != nil {
		return netip.Addr{}, 0, "", fmt.Errorf("address %s: %w", a, err)
	}
	switch a[0].Code() {
	case ma.P_IP4, ma.P_IP6:
		if c, _ := componentIP(&a[0]); c != ip {
			return netip.Addr{}, 0, "", fmt.Errorf("address %s: IP %s does not match its name", a, c)
		}
	case ma.P_DNS4:
		if !ip.Is4() {
			return netip.Addr{}, 0, "", fmt.Errorf("address %s: /dns4 with an IPv6 label", a)
		}
	case ma.P_DNS6:
		if !ip.Is6() {
			return netip.Addr{}, 0, "", fmt.Errorf("address %s: /dns6 with an IPv4 label", a)
		}
	}
	return ip, binary.BigEndian.Uint16(a[1].RawValue()), id, nil
}

// parseForgeHost splits "<ip label>.<peer label>.<forge>" (any case).
func parseForgeHost(host, forge string) (netip.Addr, peer.ID, error) {
	rest, ok := strings.CutSuffix(strings.ToLower(host), "."+forge)
	if !ok {
		return netip.Addr{}, "", fmt.Errorf("name %q is not under forge %q", host, forge)
	}
	il, pl, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(pl, ".") {
		return netip.Addr{}, "", fmt.Errorf("name %q is not <ip label>.<peer label>.%s", host, forge)
	}
	ip, err := parseIPLabel(il)
	if err != nil {
		return netip.Addr{}, "", err
	}
	if ip.IsUnspecified() {
		return netip.Addr{}, "", fmt.Errorf("name %q has an unspecified IP", host)
	}
	id, err := parsePeerIDLabel(pl)
	if err != nil {
		return netip.Addr{}, "", err
	}
	return ip, id, nil
}
