package autotls

// PeerID auth against the spec's test vectors, and by hand-made legs.

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	httppeeridauth "github.com/libp2p/go-libp2p/p2p/http/auth"
)

// authSignedData builds the data a PeerID-auth signature covers:
// "libp2p-PeerID", then each part sorted by key as
// uvarint(len(k)+1+len(v)) || k || "=" || v.
func authSignedData(parts map[string][]byte) []byte {
	keys := make([]string, 0, len(parts))
	for k := range parts {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	buf := []byte(httppeeridauth.PeerIDAuthScheme)
	for _, k := range keys {
		buf = binary.AppendUvarint(buf, uint64(len(k)+1+len(parts[k])))
		buf = append(buf, k...)
		buf = append(buf, '=')
		buf = append(buf, parts[k]...)
	}
	return buf
}

// vectorKeys returns the server (seed 32×01) and client (seed 32×02) keys.
func vectorKeys(t *testing.T) (server, client crypto.PrivKey) {
	t.Helper()
	b, _ := hex.DecodeString(vecServerPrivHex)
	server, err := crypto.UnmarshalPrivateKey(b)
	if err != nil {
		t.Fatal(err)
	}
	client, err = crypto.UnmarshalEd25519PrivateKey(ed25519.NewKeyFromSeed(bytes.Repeat([]byte{2}, 32)))
	if err != nil {
		t.Fatal(err)
	}
	return server, client
}

func TestPeerIDAuthSignatureVectors(t *testing.T) {
	server, client := vectorKeys(t)
	serverPub, _ := crypto.MarshalPublicKey(server.GetPublic())
	clientPub, _ := crypto.MarshalPublicKey(client.GetPublic())
	if got := hex.EncodeToString(clientPub); got != vecClientPubHex {
		t.Fatalf("client public key %s, want %s", got, vecClientPubHex)
	}
	for key, want := range map[string]string{
		base64.URLEncoding.EncodeToString(serverPub): "CAESIIqI4910CfGV_VLbLTy6XXLKZwm_HZQSG_N0iAG0D29c",
		base64.URLEncoding.EncodeToString(clientPub): "CAESIIE5dw6ofRdfVqNUZsNMfszLjYqRtO43ol32D1uPybOU",
	} {
		if key != want {
			t.Errorf("public key b64 %s, want %s", key, want)
		}
	}

	const challenge11 = "ERERERERERERERERERERERERERERERERERERERERERE="
	hexOf := func(s string) string { return hex.EncodeToString([]byte(s)) }
	tests := []struct {
		name     string
		signer   crypto.PrivKey
		parts    map[string][]byte
		wantData string // hex; "" to skip
		wantSig  string
	}{
		{
			name:   "server sig, spec signing example",
			signer: server,
			parts: map[string][]byte{
				"challenge-server":  []byte(challenge11),
				"client-public-key": clientPub,
				"hostname":          []byte(vecHostname),
			},
			wantData: "6c69627032702d506565724944" + "3d" + hexOf("challenge-server=") + hexOf(challenge11) +
				"36" + hexOf("client-public-key=") + vecClientPubHex + "14" + "686f73746e616d653d6578616d706c652e636f6d",
			wantSig: "UA88qZbLUzmAxrD9KECbDCgSKAUBAvBHrOCF2X0uPLR1uUCF7qGfLPc7dw3Olo-LaFCDpk5sXN7TkLWPVvuXAA==",
		},
		{
			name:   "server sig, handshake example",
			signer: server,
			parts: map[string][]byte{
				"challenge-server":  []byte("MzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMz"),
				"client-public-key": clientPub,
				"hostname":          []byte(vecHostname),
			},
			wantSig: "HQ7BJRaSpRhNCORNiALNJENdwXUyq0eM2cxNoxe-XnQw6oEAMaeYnjMYaHHjgq0XNxZmy4W2ngKUcI1CgprLCQ==",
		},
		{
			name:   "client sig, handshake example",
			signer: client,
			parts: map[string][]byte{
				"challenge-client":  []byte(challenge11),
				"server-public-key": serverPub,
				"hostname":          []byte(vecHostname),
			},
			wantData: "6c69627032702d5065657249443d" + "6368616c6c656e67652d636c69656e743d" + hexOf(challenge11) +
				"14686f73746e616d653d6578616d706c652e636f6d" + "36" + "7365727665722d7075626c69632d6b65793d" +
				"080112208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c",
			wantSig: "OrwJPO4buHKJdKXP2av8PFwv3XF_-m5MqndskeVV5UzufYzBCTm7RBaFnBS1sEhuQHZSZPh9RJgN5NmLzrUrBQ==",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := authSignedData(tt.parts)
			if tt.wantData != "" {
				if got := hex.EncodeToString(data); got != tt.wantData {
					t.Errorf("signed data\n got %s\nwant %s", got, tt.wantData)
				}
			}
			sig, err := tt.signer.Sign(data)
			if err != nil {
				t.Fatal(err)
			}
			if got := base64.URLEncoding.EncodeToString(sig); got != tt.wantSig {
				t.Errorf("signature\n got %s\nwant %s", got, tt.wantSig)
			}
		})
	}
}

// authParams parses the parameters of a "libp2p-PeerID k="v", ..." header.
func authParams(t *testing.T, h string) map[string]string {
	t.Helper()
	rest, ok := strings.CutPrefix(h, httppeeridauth.PeerIDAuthScheme+" ")
	if !ok {
		t.Fatalf("header %q does not start with the scheme", h)
	}
	params := map[string]string{}
	for kv := range strings.SplitSeq(rest, ", ") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || len(v) < 2 || v[0] != '"' || v[len(v)-1] != '"' {
			t.Fatalf("bad parameter %q in %q", kv, h)
		}
		params[k] = v[1 : len(v)-1]
	}
	return params
}

// manualLeg1 sends the first leg of a client-initiated handshake by hand,
// checks the server's signature with our own signed-data layout, and returns
// the server's challenge parameters.
func manualLeg1(t *testing.T, s *authTestServer, client crypto.PrivKey) map[string]string {
	t.Helper()
	clientPub, _ := crypto.MarshalPublicKey(client.GetPublic())
	challengeServer := base64.URLEncoding.EncodeToString(bytes.Repeat([]byte{0x33}, 32))
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.url("/"), nil)
	req.Header.Set("Authorization", httppeeridauth.PeerIDAuthScheme+
		` challenge-server="`+challengeServer+`", public-key="`+base64.URLEncoding.EncodeToString(clientPub)+`"`)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("leg 1: status %d, want 401", resp.StatusCode)
	}
	p := authParams(t, resp.Header.Get("WWW-Authenticate"))
	serverPub, _ := base64.URLEncoding.DecodeString(p["public-key"])
	pub, err := crypto.UnmarshalPublicKey(serverPub)
	if err != nil {
		t.Fatal(err)
	}
	sig, _ := base64.URLEncoding.DecodeString(p["sig"])
	ok, err := pub.Verify(authSignedData(map[string][]byte{
		"challenge-server":  []byte(challengeServer),
		"client-public-key": clientPub,
		"hostname":          []byte(s.host),
	}), sig)
	if err != nil || !ok {
		t.Fatalf("the server's signature does not verify with our signed-data layout (%v)", err)
	}
	return p
}

// manualLeg2 signs the server's challenge for hostname with our signed-data
// layout and sends the second leg; it returns the status and bearer token.
func manualLeg2(t *testing.T, s *authTestServer, client crypto.PrivKey, leg1 map[string]string, hostname string) (int, string) {
	t.Helper()
	serverPub, _ := base64.URLEncoding.DecodeString(leg1["public-key"])
	sig, err := client.Sign(authSignedData(map[string][]byte{
		"challenge-client":  []byte(leg1["challenge-client"]),
		"server-public-key": serverPub,
		"hostname":          []byte(hostname),
	}))
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.url("/"), strings.NewReader("body"))
	req.Header.Set("Authorization", httppeeridauth.PeerIDAuthScheme+
		` opaque="`+leg1["opaque"]+`", sig="`+base64.URLEncoding.EncodeToString(sig)+`"`)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	info := resp.Header.Get("Authentication-Info")
	if resp.StatusCode == http.StatusOK && !strings.Contains(info, `bearer="`) {
		t.Errorf("leg 2 accepted without a bearer token (Authentication-Info %q)", info)
	}
	return resp.StatusCode, info
}

func TestPeerIDAuthRefusalKeepsResponse(t *testing.T) {
	// A proxy in front of the server limits the rate before any handshake.
	s := newAuthTestServer(t)
	var limit atomic.Bool
	limit.Store(true)
	s.setBefore(func(w http.ResponseWriter, r *http.Request) bool {
		if !limit.Load() {
			return false
		}
		w.Header().Set("Retry-After", "30")
		w.WriteHeader(http.StatusTooManyRequests)
		io.WriteString(w, "slow down")
		return true
	})
	a := newPeerIDAuth(genTestKey(t), nil)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.url("/"), strings.NewReader("body"))
	_, resp, err := a.do(req)
	if !errors.Is(err, errHandshakeRefused) {
		t.Fatalf("err = %v, want errHandshakeRefused", err)
	}
	if resp == nil {
		t.Fatal("no response returned with the refusal")
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "30" || string(body) != "slow down" {
		t.Errorf("got %d, Retry-After %q, body %q; want the proxy's 429, 30, \"slow down\"",
			resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}

	limit.Store(false)
	postThroughAuth(t, a, s, "later")
}
