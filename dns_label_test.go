package autotls

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"testing/cryptotest"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/multiformats/go-multibase"
	mh "github.com/multiformats/go-multihash"
)

// Vector from protocol.md §3.6: the Ed25519 key with seed 32×0x02.
const (
	vectorPeerID = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
	vectorLabel  = "k51qzi5uqu5djejcj9das04p3wen7mowcz0z5iq3tw0yxaa8ko01odjley7fdg"
	testForge    = "libp2p.direct"
)

// vectorID returns the PeerID of the protocol.md vector key.
func vectorID(t testing.TB) peer.ID {
	t.Helper()
	return ed25519ID(t, 0x02)
}

// ed25519ID returns the PeerID of the Ed25519 key whose seed is 32×b.
func ed25519ID(t testing.TB, b byte) peer.ID {
	t.Helper()
	sk, err := crypto.UnmarshalEd25519PrivateKey(ed25519.NewKeyFromSeed(bytes.Repeat([]byte{b}, ed25519.SeedSize)))
	if err != nil {
		t.Fatalf("Ed25519 key: %v", err)
	}
	return idOf(t, sk)
}

func idOf(t testing.TB, sk crypto.PrivKey) peer.ID {
	t.Helper()
	id, err := peer.IDFromPrivateKey(sk)
	if err != nil {
		t.Fatalf("PeerID: %v", err)
	}
	return id
}

func TestPeerIDLabelVector(t *testing.T) {
	id := vectorID(t)
	if id.String() != vectorPeerID {
		t.Fatalf("PeerID = %s, want %s", id, vectorPeerID)
	}
	if got := peerIDLabel(id); got != vectorLabel {
		t.Errorf("peerIDLabel = %s, want %s", got, vectorLabel)
	}
	if got, want := certName(id, testForge), "*."+vectorLabel+".libp2p.direct"; got != want {
		t.Errorf("certName = %s, want %s", got, want)
	}
	if got, want := certDomain(id, testForge), vectorLabel+".libp2p.direct"; got != want {
		t.Errorf("certDomain = %s, want %s", got, want)
	}
}

func TestPeerIDLabelKeyTypes(t *testing.T) {
	secp, err := crypto.UnmarshalSecp256k1PrivateKey(bytes.Repeat([]byte{0x03}, 32))
	if err != nil {
		t.Fatalf("secp256k1 key: %v", err)
	}
	// RSA and ECDSA keys come from crypto/rand, made deterministic here.
	cryptotest.SetGlobalRandom(t, 1)
	rsa, _, err := crypto.GenerateRSAKeyPair(2048, rand.Reader)
	if err != nil {
		t.Fatalf("RSA key: %v", err)
	}
	ecdsa, _, err := crypto.GenerateECDSAKeyPair(rand.Reader)
	if err != nil {
		t.Fatalf("ECDSA key: %v", err)
	}

	tests := []struct {
		name   string
		id     peer.ID
		length int
		prefix string
	}{
		{"Ed25519", ed25519ID(t, 0x07), 62, "k51qzi5uqu5d"},
		{"secp256k1", idOf(t, secp), 63, "kzwfwj"},
		{"RSA", idOf(t, rsa), 56, "k2k4r8"},
		{"ECDSA", idOf(t, ecdsa), 56, "k2k4r8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := peerIDLabel(tt.id)
			if len(l) != tt.length || !strings.HasPrefix(l, tt.prefix) {
				t.Errorf("peerIDLabel = %s (%d chars), want %d chars starting %s", l, len(l), tt.length, tt.prefix)
			}
			if err := checkHostLabel(l); err != nil {
				t.Errorf("label is not a DNS label: %v", err)
			}
			for _, in := range []string{l, strings.ToUpper(l)} {
				got, err := parsePeerIDLabel(in)
				if err != nil || got != tt.id {
					t.Errorf("parsePeerIDLabel(%s) = %s, %v; want %s", in, got, err, tt.id)
				}
			}
		})
	}
}

// cidLabel returns the base36 CIDv1 of the multihash of data.
func cidLabel(t *testing.T, codec uint64, data []byte, hash uint64) string {
	t.Helper()
	m, err := mh.Encode(data, hash)
	if err != nil {
		t.Fatalf("multihash: %v", err)
	}
	s, err := cid.NewCidV1(codec, m).StringOfBase(multibase.Base36)
	if err != nil {
		t.Fatalf("encoding CID: %v", err)
	}
	return s
}

func TestParsePeerIDLabelRejects(t *testing.T) {
	key := []byte(vectorID(t))[2:] // the inline public key of the vector
	base32, err := peer.ToCid(vectorID(t)).StringOfBase(multibase.Base32)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, label string }{
		{"empty", ""},
		{"prefix only", "k"},
		{"base58 PeerID", vectorPeerID},
		{"lower-cased base58 PeerID", strings.ToLower(vectorPeerID)},
		{"base32 CID, too long for a label", base32},
		{"not base36", "k51qzi5uqu5d!jcj9das04p3wen7mowcz0z5iq3tw0yxaa8ko01odjley7fdg"},
		{"truncated", vectorLabel[:len(vectorLabel)-1]},
		{"extra character", vectorLabel + "0"},
		{"dag-pb codec", cidLabel(t, cid.DagProtobuf, key, mh.IDENTITY)},
		{"identity of a non-key", cidLabel(t, cid.Libp2pKey, []byte("not a protobuf public key"), mh.IDENTITY)},
		{"truncated sha2-256", cidLabel(t, cid.Libp2pKey, make([]byte, 20), mh.SHA2_256)},
		{"sha1", cidLabel(t, cid.Libp2pKey, make([]byte, 20), mh.SHA1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if id, err := parsePeerIDLabel(tt.label); err == nil {
				t.Errorf("parsePeerIDLabel(%q) = %s, want an error", tt.label, id)
			}
		})
	}
}

func TestPeerIDLabelInvalidID(t *testing.T) {
	for _, id := range []peer.ID{"", "not a multihash"} {
		if l := peerIDLabel(id); l != "" {
			t.Errorf("peerIDLabel(%q) = %q, want empty", id, l)
		}
	}
}

func TestIPLabel(t *testing.T) {
	tests := []struct {
		name  string
		ip    netip.Addr
		label string // empty: refused
	}{
		{"IPv4", netip.MustParseAddr("203.0.113.7"), "203-0-113-7"},
		{"IPv4 zeros", netip.MustParseAddr("10.0.0.1"), "10-0-0-1"},
		{"IPv6", netip.MustParseAddr("2001:db8::1"), "2001-db8--1"},
		{"IPv6 loopback", netip.MustParseAddr("::1"), "0--1"},
		{"IPv6 trailing zeros", netip.MustParseAddr("2001:db8::"), "2001-db8--0"},
		{"IPv6 unspecified", netip.MustParseAddr("::"), "0--0"},
		{"IPv6 upper case in", netip.MustParseAddr("2001:DB8:0:0:1:0:0:1"), "2001-db8--1-0-0-1"},
		{"IPv6 full", netip.MustParseAddr("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), "ffff-ffff-ffff-ffff-ffff-ffff-ffff-ffff"},
		{"IPv4-mapped", netip.MustParseAddr("::ffff:203.0.113.7"), ""},
		{"zone", netip.MustParseAddr("fe80::1%eth0"), ""},
		{"invalid", netip.Addr{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ipLabel(tt.ip)
			if tt.label == "" {
				if err == nil {
					t.Errorf("ipLabel(%v) = %q, want an error", tt.ip, got)
				}
				return
			}
			if err != nil || got != tt.label {
				t.Fatalf("ipLabel(%v) = %q, %v; want %q", tt.ip, got, err, tt.label)
			}
			back, err := parseIPLabel(got)
			if err != nil || back != tt.ip {
				t.Errorf("parseIPLabel(%q) = %v, %v; want %v", got, back, err, tt.ip)
			}
		})
	}
}

func TestParseIPLabelRejects(t *testing.T) {
	tests := []struct{ name, label string }{
		{"empty", ""},
		{"leading zero", "01-2-3-4"},
		{"three octets", "1-2-3"},
		{"five octets", "1-2-3-4-5"},
		{"octet over 255", "256-1-1-1"},
		{"word", "foo"},
		{"no dash", "1234"},
		{"dots", "1.2.3.4"},
		{"zone", "fe80--1%eth0"},
		{"zone after dash", "fe80--1-eth0"},
		{"leading double dash", "--1"},
		{"trailing double dash", "2001-db8--"},
		{"upper case", "2001-DB8--1"},
		{"expanded", "2001-db8-0-0-0-0-0-1"},
		{"leading zeros in group", "2001-0db8--1"},
		{"IPv4-mapped", "0--ffff-cb00-7107"},
		{"trailing dash", "1-2-3-4-"},
		{"colons", "2001:db8::1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if ip, err := parseIPLabel(tt.label); err == nil {
				t.Errorf("parseIPLabel(%q) = %v, want an error", tt.label, ip)
			}
		})
	}
}

func TestNormalizeForgeDomain(t *testing.T) {
	tests := []struct {
		name, in, want string // want empty: error
	}{
		{"plain", "libp2p.direct", "libp2p.direct"},
		{"upper case and trailing dot", "LibP2P.Direct.", "libp2p.direct"},
		{"three labels", "forge.example.com", "forge.example.com"},
		{"digits and dashes", "a-1.b2.c", "a-1.b2.c"},
		{"longest", strings.Repeat("a.", (maxForgeDomain-3)/2) + "com", strings.Repeat("a.", (maxForgeDomain-3)/2) + "com"},
		{"empty", "", ""},
		{"dot", ".", ""},
		{"two trailing dots", "libp2p.direct..", ""},
		{"single label", "localhost", ""},
		{"empty label", "libp2p..direct", ""},
		{"leading dot", ".libp2p.direct", ""},
		{"leading dash", "-a.direct", ""},
		{"trailing dash", "a-.direct", ""},
		{"underscore", "a_b.direct", ""},
		{"wildcard", "*.libp2p.direct", ""},
		{"space", "libp2p.direct ", ""},
		{"slash", "libp2p.direct/x", ""},
		{"numeric TLD", "1.2.3.4", ""},
		{"label too long", strings.Repeat("a", 64) + ".com", ""},
		{"too long", strings.Repeat("a.", maxForgeDomain/2) + "com", ""},
		{"non-ASCII", "bücher.example", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := normalizeForgeDomain(tt.in)
			if tt.want == "" {
				if err == nil {
					t.Errorf("normalizeForgeDomain(%q) = %q, want an error", tt.in, got)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("normalizeForgeDomain(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestNormalizeForgeDomainErrorsNameTheProblem(t *testing.T) {
	tests := []struct{ in, says string }{
		{"", "empty"},
		{"localhost", "two labels"},
		{"a_b.direct", "outside [a-z0-9-]"},
		{"-a.direct", "'-'"},
		{"1.2", "all digits"},
		{strings.Repeat("a", 64) + ".com", "longer than 63"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			_, err := normalizeForgeDomain(tt.in)
			if err == nil || !strings.Contains(err.Error(), tt.says) {
				t.Errorf("normalizeForgeDomain(%q) = %v, want an error saying %q", tt.in, err, tt.says)
			}
		})
	}
}

func TestIsForgeListenAddr(t *testing.T) {
	tests := []struct {
		name, addr, forge string
		want              bool
	}{
		{"ip4", "/ip4/0.0.0.0/tcp/4001/tls/sni/*.libp2p.direct/ws", testForge, true},
		{"ip6", "/ip6/::1/tcp/0/tls/sni/*.libp2p.direct/ws", testForge, true},
		{"forge case", "/ip4/1.2.3.4/tcp/1/tls/sni/*.LIBP2P.direct/ws", "libp2p.DIRECT.", true},
		{"other forge", "/ip4/1.2.3.4/tcp/1/tls/sni/*.example.com/ws", testForge, false},
		{"sub-domain of forge", "/ip4/1.2.3.4/tcp/1/tls/sni/*.x.libp2p.direct/ws", testForge, false},
		{"no wildcard", "/ip4/1.2.3.4/tcp/1/tls/sni/libp2p.direct/ws", testForge, false},
		{"announced", "/ip4/1.2.3.4/tcp/1/tls/sni/1-2-3-4." + vectorLabel + ".libp2p.direct/ws", testForge, false},
		{"plain tcp", "/ip4/1.2.3.4/tcp/1", testForge, false},
		{"plain ws", "/ip4/1.2.3.4/tcp/1/ws", testForge, false},
		{"wss", "/ip4/1.2.3.4/tcp/1/wss", testForge, false},
		{"with p2p", "/ip4/1.2.3.4/tcp/1/tls/sni/*.libp2p.direct/ws/p2p/" + vectorPeerID, testForge, false},
		{"dns4", "/dns4/example.com/tcp/1/tls/sni/*.libp2p.direct/ws", testForge, false},
		{"udp", "/ip4/1.2.3.4/udp/1/tls/sni/*.libp2p.direct/ws", testForge, false},
		{"zone", "/ip6zone/eth0/ip6/fe80::1/tcp/1/tls/sni/*.libp2p.direct/ws", testForge, false},
		{"empty forge", "/ip4/1.2.3.4/tcp/1/tls/sni/*./ws", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := isForgeListenAddr(ma.StringCast(tt.addr), tt.forge); got != tt.want {
				t.Errorf("isForgeListenAddr(%s, %q) = %v, want %v", tt.addr, tt.forge, got, tt.want)
			}
		})
	}
	if isForgeListenAddr(nil, testForge) {
		t.Error("isForgeListenAddr(nil) = true")
	}
}

func TestWSSListenAddr(t *testing.T) {
	tests := []struct {
		name, addr, forge, want string // want empty: not ok
	}{
		{"ip4", "/ip4/0.0.0.0/tcp/4001", testForge, "/ip4/0.0.0.0/tcp/4001/tls/sni/*.libp2p.direct/ws"},
		{"ip6", "/ip6/::/tcp/0", testForge, "/ip6/::/tcp/0/tls/sni/*.libp2p.direct/ws"},
		{"forge normalized", "/ip4/127.0.0.1/tcp/1", "Forge.Example.", "/ip4/127.0.0.1/tcp/1/tls/sni/*.forge.example/ws"},
		{"invalid forge", "/ip4/127.0.0.1/tcp/1", "a/b", ""},
		{"already ws", "/ip4/127.0.0.1/tcp/1/ws", testForge, ""},
		{"p2p suffix", "/ip4/127.0.0.1/tcp/1/p2p/" + vectorPeerID, testForge, ""},
		{"udp", "/ip4/127.0.0.1/udp/1", testForge, ""},
		{"dns", "/dns4/example.com/tcp/1", testForge, ""},
		{"ip only", "/ip4/127.0.0.1", testForge, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := wssListenAddr(ma.StringCast(tt.addr), tt.forge)
			if tt.want == "" {
				if ok {
					t.Errorf("wssListenAddr(%s) = %s, want not ok", tt.addr, got)
				}
				return
			}
			if !ok || got.String() != tt.want {
				t.Fatalf("wssListenAddr(%s) = %s, %v; want %s", tt.addr, got, ok, tt.want)
			}
			if !isForgeListenAddr(got, tt.forge) {
				t.Errorf("result %s is not a forge listen address", got)
			}
		})
	}
}

func TestForgeAddr(t *testing.T) {
	id := vectorID(t)
	name := func(ip string) string { return ip + "." + vectorLabel + ".libp2p.direct" }
	tests := []struct {
		name, listen, forge string
		short               bool
		want                string // empty: not ok
	}{
		{"ip4 long", "/ip4/203.0.113.7/tcp/4001/tls/sni/*.libp2p.direct/ws", testForge, false,
			"/ip4/203.0.113.7/tcp/4001/tls/sni/" + name("203-0-113-7") + "/ws"},
		{"ip4 short", "/ip4/203.0.113.7/tcp/4001/tls/sni/*.libp2p.direct/ws", testForge, true,
			"/dns4/" + name("203-0-113-7") + "/tcp/4001/tls/ws"},
		{"ip6 long", "/ip6/2001:db8::1/tcp/4001/tls/sni/*.libp2p.direct/ws", testForge, false,
			"/ip6/2001:db8::1/tcp/4001/tls/sni/" + name("2001-db8--1") + "/ws"},
		{"ip6 short", "/ip6/2001:db8::1/tcp/4001/tls/sni/*.libp2p.direct/ws", testForge, true,
			"/dns6/" + name("2001-db8--1") + "/tcp/4001/tls/ws"},
		{"ip6 loopback", "/ip6/::1/tcp/5/tls/sni/*.libp2p.direct/ws", testForge, true,
			"/dns6/" + name("0--1") + "/tcp/5/tls/ws"},
		{"forge case in address", "/ip4/127.0.0.1/tcp/1/tls/sni/*.LibP2P.Direct/ws", testForge, false,
			"/ip4/127.0.0.1/tcp/1/tls/sni/" + name("127-0-0-1") + "/ws"},
		{"forge case in argument", "/ip4/127.0.0.1/tcp/1/tls/sni/*.libp2p.direct/ws", "LIBP2P.DIRECT.", true,
			"/dns4/" + name("127-0-0-1") + "/tcp/1/tls/ws"},
		{"other forge", "/ip4/203.0.113.7/tcp/4001/tls/sni/*.example.com/ws", testForge, false, ""},
		{"plain tcp", "/ip4/203.0.113.7/tcp/4001", testForge, false, ""},
		{"p2p suffix", "/ip4/203.0.113.7/tcp/4001/tls/sni/*.libp2p.direct/ws/p2p/" + vectorPeerID, testForge, false, ""},
		{"already announced", "/ip4/203.0.113.7/tcp/4001/tls/sni/" + name("203-0-113-7") + "/ws", testForge, false, ""},
		{"ip4 unspecified", "/ip4/0.0.0.0/tcp/4001/tls/sni/*.libp2p.direct/ws", testForge, false, ""},
		{"ip6 unspecified", "/ip6/::/tcp/4001/tls/sni/*.libp2p.direct/ws", testForge, true, ""},
		{"ip4-mapped ip6", "/ip6/::ffff:203.0.113.7/tcp/4001/tls/sni/*.libp2p.direct/ws", testForge, false, ""},
		{"invalid forge", "/ip4/203.0.113.7/tcp/4001/tls/sni/*.libp2p.direct/ws", "libp2p..direct", false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := forgeAddr(ma.StringCast(tt.listen), id, tt.forge, tt.short)
			if tt.want == "" {
				if ok {
					t.Errorf("forgeAddr(%s) = %s, want not ok", tt.listen, got)
				}
				return
			}
			if !ok || got.String() != tt.want {
				t.Fatalf("forgeAddr(%s) = %s, %v; want %s", tt.listen, got, ok, tt.want)
			}
			// The result survives a trip through bytes (valid components).
			if back, err := ma.NewMultiaddrBytes(got.Bytes()); err != nil || !back.Equal(got) {
				t.Errorf("re-reading %s from bytes: %v, %v", got, back, err)
			}
		})
	}

	listen := ma.StringCast("/ip4/203.0.113.7/tcp/4001/tls/sni/*.libp2p.direct/ws")
	if got, ok := forgeAddr(listen, "", testForge, false); ok {
		t.Errorf("forgeAddr with an empty PeerID = %s, want not ok", got)
	}
}

func TestParseForgeAddrRoundTrip(t *testing.T) {
	id := vectorID(t)
	for _, listen := range []string{
		"/ip4/203.0.113.7/tcp/4001/tls/sni/*.libp2p.direct/ws",
		"/ip4/127.0.0.1/tcp/65535/tls/sni/*.libp2p.direct/ws",
		"/ip6/2001:db8::1/tcp/443/tls/sni/*.libp2p.direct/ws",
		"/ip6/::1/tcp/1/tls/sni/*.libp2p.direct/ws",
	} {
		for _, short := range []bool{false, true} {
			a, ok := forgeAddr(ma.StringCast(listen), id, testForge, short)
			if !ok {
				t.Fatalf("forgeAddr(%s, short=%v) not ok", listen, short)
			}
			wantIP, _ := componentIP(&ma.StringCast(listen)[0])
			wantPort := ma.StringCast(listen)[1].Value()
			for name, in := range map[string]string{
				"plain":      a.String(),
				"with p2p":   a.String() + "/p2p/" + vectorPeerID,
				"upper case": upperName(a),
			} {
				t.Run(a.String()+"/"+name, func(t *testing.T) {
					ip, port, gotID, err := parseForgeAddr(ma.StringCast(in), "LibP2P.direct")
					if err != nil {
						t.Fatalf("parseForgeAddr(%s): %v", in, err)
					}
					if ip != wantIP || strconv.Itoa(int(port)) != wantPort || gotID != id {
						t.Errorf("parseForgeAddr(%s) = %v, %d, %s; want %v, %s, %s", in, ip, port, gotID, wantIP, wantPort, id)
					}
				})
			}
		}
	}
}

// upperName returns the text of a with its DNS name in upper case.
func upperName(a ma.Multiaddr) string {
	s := a.String()
	i := strings.Index(s, vectorLabel)
	j := strings.LastIndex(s, ".libp2p.direct") + len(".libp2p.direct")
	start := strings.LastIndex(s[:i], "/") + 1
	return s[:start] + strings.ToUpper(s[start:j]) + s[j:]
}

func TestParseForgeAddrRejects(t *testing.T) {
	name := func(ip string) string { return ip + "." + vectorLabel + ".libp2p.direct" }
	tests := []struct{ name, addr, forge string }{
		{"other forge", "/dns4/" + name("1-2-3-4") + "/tcp/1/tls/ws", "example.com"},
		{"forge is a suffix of another", "/dns4/1-2-3-4." + vectorLabel + ".xlibp2p.direct/tcp/1/tls/ws", testForge},
		{"invalid forge", "/dns4/" + name("1-2-3-4") + "/tcp/1/tls/ws", "direct"},
		{"ip mismatch", "/ip4/1.2.3.4/tcp/1/tls/sni/" + name("5-6-7-8") + "/ws", testForge},
		{"ip family mismatch", "/ip6/::1/tcp/1/tls/sni/" + name("1-2-3-4") + "/ws", testForge},
		{"ip4-mapped ip6", "/ip6/::ffff:1.2.3.4/tcp/1/tls/sni/" + name("1-2-3-4") + "/ws", testForge},
		{"dns4 with ipv6 label", "/dns4/" + name("2001-db8--1") + "/tcp/1/tls/ws", testForge},
		{"dns6 with ipv4 label", "/dns6/" + name("1-2-3-4") + "/tcp/1/tls/ws", testForge},
		{"dns instead of dns4", "/dns/" + name("1-2-3-4") + "/tcp/1/tls/ws", testForge},
		{"unspecified", "/dns4/" + name("0-0-0-0") + "/tcp/1/tls/ws", testForge},
		{"extra label", "/dns4/a." + name("1-2-3-4") + "/tcp/1/tls/ws", testForge},
		{"no ip label", "/dns4/" + vectorLabel + ".libp2p.direct/tcp/1/tls/ws", testForge},
		{"bad ip label", "/dns4/" + name("01-2-3-4") + "/tcp/1/tls/ws", testForge},
		{"bad peer label", "/dns4/1-2-3-4.k51qzi.libp2p.direct/tcp/1/tls/ws", testForge},
		{"base58 peer", "/dns4/1-2-3-4." + vectorPeerID + ".libp2p.direct/tcp/1/tls/ws", testForge},
		{"trailing dot", "/dns4/" + name("1-2-3-4") + "./tcp/1/tls/ws", testForge},
		{"wildcard", "/ip4/1.2.3.4/tcp/1/tls/sni/*.libp2p.direct/ws", testForge},
		{"short with sni", "/dns4/" + name("1-2-3-4") + "/tcp/1/tls/sni/" + name("1-2-3-4") + "/ws", testForge},
		{"long without sni", "/ip4/1.2.3.4/tcp/1/tls/ws", testForge},
		{"wss", "/dns4/" + name("1-2-3-4") + "/tcp/1/wss", testForge},
		{"p2p in the middle", "/dns4/" + name("1-2-3-4") + "/tcp/1/p2p/" + vectorPeerID + "/tls/ws", testForge},
		{"two p2p", "/dns4/" + name("1-2-3-4") + "/tcp/1/tls/ws/p2p/" + vectorPeerID + "/p2p/" + vectorPeerID, testForge},
		{"udp", "/dns4/" + name("1-2-3-4") + "/udp/1/tls/ws", testForge},
		{"relay", "/ip4/1.2.3.4/tcp/1/p2p/" + vectorPeerID + "/p2p-circuit", testForge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if ip, port, id, err := parseForgeAddr(ma.StringCast(tt.addr), tt.forge); err == nil {
				t.Errorf("parseForgeAddr(%s) = %v, %d, %s; want an error", tt.addr, ip, port, id)
			}
		})
	}
	if _, _, _, err := parseForgeAddr(nil, testForge); err == nil {
		t.Error("parseForgeAddr(nil) succeeded")
	}
}

// listenAddrFor builds the forge listen address for ip and port.
func listenAddrFor(t *testing.T, ip netip.Addr, port uint16, forge string) ma.Multiaddr {
	t.Helper()
	proto := "ip6"
	if ip.Is4() {
		proto = "ip4"
	}
	ipc, err := ma.NewComponent(proto, ip.String())
	if err != nil {
		t.Fatalf("ip component: %v", err)
	}
	tcp, err := ma.NewComponent("tcp", strconv.Itoa(int(port)))
	if err != nil {
		t.Fatalf("tcp component: %v", err)
	}
	a, ok := wssListenAddr(ma.Multiaddr{*ipc, *tcp}, forge)
	if !ok {
		t.Fatalf("wssListenAddr(%s/%s) not ok", ipc, tcp)
	}
	return a
}
