package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/goleak"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// issued is a host's storage after a real issuance by the test forge.
type issued struct {
	dir     string            // the storage directory
	keyFile string            // the identity key, as examples/node writes it
	id      peer.ID           // the host's PeerID
	leaf    *x509.Certificate // the certificate the host served over WSS
	tcpPort string            // the host's TCP port
}

// issue runs a host with autotls against f, storing in a new directory,
// until it serves a certificate; it reads that certificate from a real
// TLS handshake with the WSS listener, then closes the host.
func issue(t *testing.T, f *testforge.Forge) issued {
	t.Helper()
	key, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	base := t.TempDir()
	is := issued{dir: filepath.Join(base, "store"), keyFile: filepath.Join(base, "identity.key")}
	if err := os.WriteFile(is.keyFile, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := storage.Dir(is.dir)
	if err != nil {
		t.Fatal(err)
	}
	h, err := libp2p.New(append(f.HostOptions(),
		libp2p.Identity(key),
		autotls.Option(
			autotls.WithForgeDomain(f.Domain),
			autotls.WithRegistrationEndpoint(f.BrokerURL),
			autotls.WithCA(f.CAURL, f.CARoots),
			autotls.WithResolver(f.Resolver()),
			autotls.WithStorage(st),
			autotls.WithAllowPrivateAddrs(),
		))...)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	is.id = h.ID()
	// The WSS address is announced once the certificate is loaded; each
	// change of the host's addresses is an event.
	sub, err := h.EventBus().Subscribe(new(event.EvtLocalAddressesUpdated))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	wssAddr := func() ma.Multiaddr {
		for _, a := range h.Addrs() {
			if _, err := a.ValueForProtocol(ma.P_SNI); err == nil {
				return a
			}
		}
		return nil
	}
	timeout := time.After(30 * time.Second)
	wss := wssAddr()
	for wss == nil {
		select {
		case <-sub.Out():
			wss = wssAddr()
		case <-timeout:
			t.Fatalf("no WSS address announced within 30 s: %v", h.Addrs())
		}
	}
	// The served certificate, read over TLS from the WSS listener.
	sni, _ := wss.ValueForProtocol(ma.P_SNI)
	ip, _ := wss.ValueForProtocol(ma.P_IP4)
	is.tcpPort, _ = wss.ValueForProtocol(ma.P_TCP)
	conn, err := tls.Dial("tcp", ip+":"+is.tcpPort, &tls.Config{ServerName: sni, RootCAs: f.IssuerRoots})
	if err != nil {
		t.Fatalf("TLS handshake with %s: %v", wss, err)
	}
	is.leaf = conn.ConnectionState().PeerCertificates[0]
	_ = conn.Close()
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	return is
}

// copyStore copies the issued storage to a new directory, for a test to
// damage.
func copyStore(t *testing.T, is issued) issued {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "store")
	if err := os.CopyFS(dst, os.DirFS(is.dir)); err != nil {
		t.Fatal(err)
	}
	is.dir = dst
	return is
}

// cmd runs the command with args as main would, and returns its output
// and exit status. Nothing it starts may outlive it.
func cmd(t *testing.T, args ...string) (stdout string, code int) {
	t.Helper()
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	var out, errb bytes.Buffer
	code = run(t.Context(), args, &out, &errb)
	if errb.Len() > 0 {
		t.Errorf("stderr: %s", errb.String())
	}
	return out.String(), code
}

// lines joins want as the command prints them.
func lines(want ...string) string { return strings.Join(want, "\n") + "\n" }

func checkOutput(t *testing.T, got string, code int, want string, wantCode int) {
	t.Helper()
	if got != want {
		t.Errorf("output:\n%s\nwant:\n%s", got, want)
	}
	if code != wantCode {
		t.Errorf("exit status %d, want %d", code, wantCode)
	}
}

// storePath is the file of a storage key in a storage.Dir.
func storePath(dir, key string) string { return filepath.Join(dir, filepath.FromSlash(key)) }

func TestUsage(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		code    int
		wantErr string
	}{
		{"no command", nil, 2, "usage:"},
		{"help", []string{"doctor", "-h"}, 0, "usage: autotls doctor [flags]\n"},
		{"unknown command", []string{"stats"}, 2, `autotls: unknown command "stats"`},
		{"no identity", []string{"status"}, 2, "autotls status: name the host: -peer <PeerID>, or -identity <key file>\n"},
		{"both identities", []string{"status", "-peer", "x", "-identity", "y"}, 2, "autotls status: give -peer or -identity, not both\n"},
		{"bad peer", []string{"doctor", "-peer", "nope"}, 2, `autotls doctor: -peer "nope" is not a PeerID`},
		{"identity not a key", []string{"status", "-identity", "main.go"}, 2, "autotls status: -identity main.go holds no libp2p private key"},
		{"other forge without endpoint", []string{"doctor", "-peer", "12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf", "-forge", "example.net"}, 2, "autotls doctor: -endpoint is required with -forge example.net\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(context.Background(), tc.args, &out, &errb)
			if code != tc.code || !strings.HasPrefix(errb.String(), tc.wantErr) {
				t.Errorf("exit %d, stderr %q; want %d, %q", code, errb.String(), tc.code, tc.wantErr)
			}
		})
	}
}

// TestProgram runs the real program once, as a user does, to check main's
// exit status; the other tests call run in-process.
func TestProgram(t *testing.T) {
	if os.Getenv("AUTOTLS_CMD") == "1" {
		os.Args = append([]string{"autotls"}, strings.Fields(os.Getenv("AUTOTLS_ARGS"))...)
		main()
		return
	}
	dir := filepath.Join(t.TempDir(), "missing")
	c := exec.Command(os.Args[0], "-test.run=^TestProgram$")
	c.Env = append(os.Environ(), "AUTOTLS_CMD=1", "AUTOTLS_ARGS=status -peer 12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf -storage "+dir)
	out, err := c.Output()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("exit: %v, want status 1; output %s", err, out)
	}
	if !strings.Contains(string(out), "certificate  none: "+dir+" does not exist") {
		t.Errorf("output %s", out)
	}
}

func mustKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
