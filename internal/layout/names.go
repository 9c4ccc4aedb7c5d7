package layout

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multibase"
)

// PeerLabel returns the DNS label for id: its CIDv1 (codec libp2p-key,
// 0x72) in lower-case multibase base36, prefix 'k'. For an Ed25519 key this
// is 62 characters, for secp256k1 63, for RSA and ECDSA 56. It returns ""
// for an ID that is not a valid multihash (such as the empty ID).
func PeerLabel(id peer.ID) string {
	c := peer.ToCid(id)
	if !c.Defined() {
		return ""
	}
	s, err := c.StringOfBase(multibase.Base36)
	if err != nil {
		return ""
	}
	return s
}

// IPLabel returns the DNS label for ip. An IPv4 address is its dotted quad
// with '.' replaced by '-' ("203-0-113-7"). An IPv6 address is its RFC 5952
// text with ':' replaced by '-', with "0" prepended if that starts with '-'
// and appended if it ends with '-', so that the label is a valid host name
// ("2001-db8--1", "0--1", "2001-db8--0", "0--0"). IPv4-mapped IPv6
// addresses (their text has dots), addresses with a zone, and the zero
// [netip.Addr] are refused.
func IPLabel(ip netip.Addr) (string, error) {
	switch {
	case !ip.IsValid():
		return "", errors.New("invalid IP address")
	case ip.Zone() != "":
		return "", fmt.Errorf("IP address %s has a zone", ip)
	case ip.Is4In6():
		return "", fmt.Errorf("IPv4-mapped IPv6 address %s cannot be a DNS label", ip)
	case ip.Is4():
		return strings.ReplaceAll(ip.String(), ".", "-"), nil
	}
	l := strings.ReplaceAll(ip.String(), ":", "-")
	if strings.HasPrefix(l, "-") {
		l = "0" + l
	}
	if strings.HasSuffix(l, "-") {
		l += "0"
	}
	return l, nil
}

// CertName returns the only name in the certificate for id under the
// forge domain forge (lower case, no trailing dot): "*.<peer label>.<forge>".
func CertName(id peer.ID, forge string) string { return "*." + PeerLabel(id) + "." + forge }
