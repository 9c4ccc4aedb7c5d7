package autotls

// This file holds the pure naming code: the forge domain, the base36 PeerID
// label, the IP label, the certificate names, and the forge multiaddrs.
// Nothing here does I/O, and nothing panics on input.

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/p2ptls/autotls/internal/layout"
)

const (
	// maxDNSName is the longest DNS name in text form, without a trailing dot.
	maxDNSName = 253
	// maxDNSLabel is the longest DNS label.
	maxDNSLabel = 63
	// maxIPLabel is the longest label ipLabel emits: an IPv6 address with
	// no zero group, "ffff-ffff-ffff-ffff-ffff-ffff-ffff-ffff".
	maxIPLabel = 39
	// maxForgeDomain is the longest forge domain for which every name we
	// build fits in maxDNSName: "<ip label>.<peer label>.<forge>", with the
	// longest IP label and a full 63-character peer label (secp256k1).
	maxForgeDomain = maxDNSName - maxIPLabel - 1 - maxDNSLabel - 1
)

// normalizeForgeDomain lower-cases d, strips one trailing dot, and validates
// it as a DNS name: non-empty, at least two labels, each label 1..63
// characters of [a-z0-9-] that neither starts nor ends with '-', a last label
// that is not all digits, and short enough that every name built under it
// ("<ip label>.<peer label>.<domain>", and so "*.<peer label>.<domain>") fits
// in 253 characters. Errors name the problem.
func normalizeForgeDomain(d string) (string, error) {
	n := strings.ToLower(strings.TrimSuffix(d, "."))
	if n == "" {
		return "", errors.New("forge domain is empty")
	}
	if len(n) > maxForgeDomain {
		return "", fmt.Errorf("forge domain %q is %d characters long, more than the %d that leave room for the peer and IP labels", d, len(n), maxForgeDomain)
	}
	labels := strings.Split(n, ".")
	if len(labels) < 2 {
		return "", fmt.Errorf("forge domain %q needs at least two labels", d)
	}
	for _, l := range labels {
		if err := checkHostLabel(l); err != nil {
			return "", fmt.Errorf("forge domain %q: %w", d, err)
		}
	}
	if strings.Trim(labels[len(labels)-1], "0123456789") == "" {
		return "", fmt.Errorf("forge domain %q: top-level label is all digits", d)
	}
	return n, nil
}

// checkHostLabel reports whether l is a lower-case RFC 1123 host label.
func checkHostLabel(l string) error {
	switch {
	case l == "":
		return errors.New("empty label")
	case len(l) > maxDNSLabel:
		return fmt.Errorf("label %q is longer than %d characters", l, maxDNSLabel)
	case l[0] == '-' || l[len(l)-1] == '-':
		return fmt.Errorf("label %q starts or ends with '-'", l)
	}
	for i := 0; i < len(l); i++ {
		if c := l[i]; !isLowerAlnum(c) && c != '-' {
			return fmt.Errorf("label %q has character %q outside [a-z0-9-]", l, c)
		}
	}
	return nil
}

func isLowerAlnum(c byte) bool {
	return ('a' <= c && c <= 'z') || ('0' <= c && c <= '9')
}

// peerIDLabel returns the DNS label for id ([layout.PeerLabel]).
func peerIDLabel(id peer.ID) string { return layout.PeerLabel(id) }

// ipLabel returns the DNS label for ip ([layout.IPLabel]).
func ipLabel(ip netip.Addr) (string, error) { return layout.IPLabel(ip) }

// certName returns the only name in the certificate for id:
// "*.<peer label>.<forge>". forge must be normalized
// ([normalizeForgeDomain]).
func certName(id peer.ID, forge string) string {
	return "*." + certDomain(id, forge)
}

// certDomain returns "<peer label>.<forge>", the ACME authorization
// identifier of [certName]; the DNS-01 TXT record is at
// "_acme-challenge." + certDomain. forge must be normalized.
func certDomain(id peer.ID, forge string) string {
	return peerIDLabel(id) + "." + forge
}

// isForgeListenAddr reports whether a has the shape
// /ip4|ip6/<ip>/tcp/<port>/tls/sni/*.<forge>/ws (exactly; forge compared
// case-insensitively).
// It is called for every address the host announces, so it does not
// allocate beyond reading the /sni value.
func isForgeListenAddr(a ma.Multiaddr, forge string) bool {
	return len(a) == 5 && isIPTCP(a[:2]) &&
		a[2].Code() == ma.P_TLS &&
		a[3].Code() == ma.P_SNI && isWildcardOf(a[3].Value(), forge) &&
		a[4].Code() == ma.P_WS
}

// isWildcardOf reports whether name is "*.<forge>", ignoring case and a
// trailing dot on forge.
func isWildcardOf(name, forge string) bool {
	forge = strings.TrimSuffix(forge, ".")
	rest, ok := strings.CutPrefix(name, "*.")
	return ok && forge != "" && strings.EqualFold(rest, forge)
}

// isIPTCP reports whether a is exactly /ip4|ip6/<ip>/tcp/<port>.
func isIPTCP(a ma.Multiaddr) bool {
	return len(a) == 2 &&
		(a[0].Code() == ma.P_IP4 || a[0].Code() == ma.P_IP6) &&
		a[1].Code() == ma.P_TCP
}

// wssListenAddr turns a plain TCP listen address /ipX/<ip>/tcp/<port>
// (nothing after) into /ipX/<ip>/tcp/<port>/tls/sni/*.<forge>/ws; ok=false
// for any other shape, or if forge is not a valid forge domain.
func wssListenAddr(tcp ma.Multiaddr, forge string) (ma.Multiaddr, bool) {
	forge, err := normalizeForgeDomain(forge)
	if err != nil || !isIPTCP(tcp) {
		return nil, false
	}
	tail, err := tlsTail("*." + forge)
	if err != nil {
		return nil, false
	}
	return append(ma.Multiaddr{tcp[0], tcp[1]}, tail...), true
}

// tlsTail returns /tls/sni/<sni>/ws, or /tls/ws if sni is empty.
func tlsTail(sni string) (ma.Multiaddr, error) {
	tls, err := ma.NewComponent("tls", "")
	if err != nil {
		return nil, fmt.Errorf("building /tls component: %w", err)
	}
	ws, err := ma.NewComponent("ws", "")
	if err != nil {
		return nil, fmt.Errorf("building /ws component: %w", err)
	}
	if sni == "" {
		return ma.Multiaddr{*tls, *ws}, nil
	}
	s, err := ma.NewComponent("sni", sni)
	if err != nil {
		return nil, fmt.Errorf("building /sni component: %w", err)
	}
	return ma.Multiaddr{*tls, *s, *ws}, nil
}

// forgeAddr rewrites a forge listen address ([isForgeListenAddr] shape) to
// its announced form:
//
//	long:  /ipX/<ip>/tcp/<port>/tls/sni/<ip label>.<peer label>.<forge>/ws
//	short: /dns4|dns6/<ip label>.<peer label>.<forge>/tcp/<port>/tls/ws
//
// ok=false if a has another shape, or its IP cannot be labelled, or the IP
// is unspecified (0.0.0.0, ::), or id has no valid peer label.
func forgeAddr(a ma.Multiaddr, id peer.ID, forge string, short bool) (ma.Multiaddr, bool) {
	forge, err := normalizeForgeDomain(forge)
	if err != nil || !isForgeListenAddr(a, forge) {
		return nil, false
	}
	ip, ok := componentIP(&a[0])
	if !ok || ip.IsUnspecified() {
		return nil, false
	}
	il, err := ipLabel(ip)
	if err != nil {
		return nil, false
	}
	pl := peerIDLabel(id)
	if pl == "" || len(pl) > maxDNSLabel {
		return nil, false
	}
	host := il + "." + pl + "." + forge
	if !short {
		tail, err := tlsTail(host)
		if err != nil {
			return nil, false
		}
		return append(ma.Multiaddr{a[0], a[1]}, tail...), true
	}
	dns := "dns6"
	if ip.Is4() {
		dns = "dns4"
	}
	d, err := ma.NewComponent(dns, host)
	if err != nil {
		return nil, false
	}
	tail, err := tlsTail("")
	if err != nil {
		return nil, false
	}
	return append(ma.Multiaddr{*d, a[1]}, tail...), true
}

// componentIP returns the address of an /ip4 or /ip6 component.
func componentIP(c *ma.Component) (netip.Addr, bool) {
	switch c.Code() {
	case ma.P_IP4, ma.P_IP6:
		return netip.AddrFromSlice(c.RawValue())
	}
	return netip.Addr{}, false
}
