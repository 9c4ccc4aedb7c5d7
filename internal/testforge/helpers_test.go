package testforge

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"log/slog"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
)

// startForge starts a forge that logs to the test (with -v) and closes
// with it.
func startForge(t testing.TB, cfg Config) *Forge {
	t.Helper()
	if cfg.Logger == nil && testing.Verbose() {
		cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return New(t, cfg)
}

// seededKey returns the Ed25519 key whose seed is 32 bytes of b
// (b = 2 is the key of the PeerID-auth spec example).
func seededKey(t testing.TB, b byte) (crypto.PrivKey, peer.ID) {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(bytes.NewReader(bytes.Repeat([]byte{b}, 32)))
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return k, id
}

// newHost starts a loopback libp2p host with the forge's options and the
// given identity, closed with the test.
func newHost(t testing.TB, f *Forge, key crypto.PrivKey) host.Host {
	t.Helper()
	h := newHostNoCleanup(t, f, key)
	t.Cleanup(func() { _ = h.Close() })
	return h
}

func newHostNoCleanup(t testing.TB, f *Forge, key crypto.PrivKey) host.Host {
	t.Helper()
	h, err := libp2p.New(append(f.HostOptions(), libp2p.Identity(key))...)
	if err != nil {
		t.Fatalf("libp2p.New: %v", err)
	}
	return h
}

// digest returns a valid DNS-01 value (unpadded base64url of 32 bytes).
func digest(s string) string {
	h := sha256.Sum256([]byte(s))
	return base64.RawURLEncoding.EncodeToString(h[:])
}

// waitGoroutines waits until no more than n goroutines run, and fails with
// a dump of them if that does not happen within a few seconds. A settle loop
// rather than an exact count: goroutines of closed connections and timers
// take a moment to exit.
func waitGoroutines(t testing.TB, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := runtime.NumGoroutine()
		if got <= n {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines still running, want at most %d:\n%s", got, n, buf)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func hasPrefix(s, prefix string) bool { return strings.HasPrefix(s, prefix) }
