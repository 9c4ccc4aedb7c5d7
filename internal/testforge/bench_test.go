package testforge

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"net/http"
	"testing"
)

// BenchmarkStartClose reports the cost of a whole forge's lifecycle.
func BenchmarkStartClose(b *testing.B) {
	for b.Loop() {
		f, err := Start(Config{})
		if err != nil {
			b.Fatal(err)
		}
		if err := f.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIssueDirect is the bare ACME floor: new account, order, DNS-01
// written straight into the store, finalize, download.
func BenchmarkIssueDirect(b *testing.B) {
	f := startForge(b, Config{})
	_, id := seededKey(b, 2)
	certKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := f.IssueDirect(b.Context(), id, certKey); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRegistration is one broker registration with a reused bearer
// token: request checks, a libp2p dial-back with identify, the store write.
func BenchmarkRegistration(b *testing.B) {
	f := startForge(b, Config{})
	key, _ := seededKey(b, 2)
	h := newHost(b, f, key)
	c := newClient(f, key)
	body := registrationBody(b, digest("bench"), h)
	for b.Loop() {
		if r := c.do(b, http.MethodPost, body, nil); r.status != http.StatusOK {
			b.Fatalf("registration = %d %q", r.status, r.body)
		}
	}
}
