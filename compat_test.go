package autotls

// Compatibility with storage written by earlier releases. testdata/store-v1
// is a storage directory written by the release before the core was
// rebuilt (TestGenerateStoreV1Fixture made it); TestServeStoreV1 checks
// that the current code serves its certificate without a single request.

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// The store-v1 fixture: its files, and how it was made.
const (
	storeV1Dir      = "testdata/store-v1"
	storeV1Store    = storeV1Dir + "/store"        // the storage directory
	storeV1Identity = storeV1Dir + "/identity.key" // the host's libp2p key, crypto.MarshalPrivateKey
	storeV1Root     = storeV1Dir + "/root.pem"     // the root the stored chain verifies to
	storeV1Forge    = storeV1Dir + "/forge.json"   // storeV1Info
	writeFixtureEnv = "AUTOTLS_WRITE_FIXTURE"      // "1" runs TestGenerateStoreV1Fixture
	storeV1Validity = 100 * 365 * 24 * time.Hour   // of the stored certificate (Pebble takes up to 292 years)
	storeV1Seed     = "autotls testdata/store-v1"  // hashed into the identity's Ed25519 seed
)

// storeV1Info is forge.json: what the storage keys of the fixture depend
// on. The CA's directory URL names the certificate's directory
// (certificates/<issuer key>/...), so a host must be given exactly CAURL
// to find it; the CA behind it is long gone and is never contacted.
type storeV1Info struct {
	Domain    string    `json:"domain"`     // the forge domain
	CAURL     string    `json:"ca_url"`     // the ACME directory URL the host was given
	IssuerKey string    `json:"issuer_key"` // CAURL's host and path as named in storage
	PeerID    string    `json:"peer_id"`    // of identity.key
	CertName  string    `json:"cert_name"`  // *.<b36 peer id>.<domain>
	NotBefore time.Time `json:"not_before"` // the certificate's validity
	NotAfter  time.Time `json:"not_after"`
}

// TestGenerateStoreV1Fixture writes testdata/store-v1 with the code of this
// commit: a host with a fixed identity obtains a certificate from a test
// forge into an on-disk store, and the store is kept with what is needed
// to serve it again. It runs only with AUTOTLS_WRITE_FIXTURE=1, and only
// where testdata/store-v1 does not exist: the committed fixture is the
// record of the release that wrote it, and later code is to read it, not
// to rewrite it.
func TestGenerateStoreV1Fixture(t *testing.T) {
	if os.Getenv(writeFixtureEnv) != "1" {
		t.Skipf("set %s=1 to write %s with this code", writeFixtureEnv, storeV1Dir)
	}
	if _, err := os.Stat(storeV1Dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("%s exists (%v): it records what an earlier release stored; remove it by hand to write a new one", storeV1Dir, err)
	}
	// The default domain, as TestServeStoreV1's forge has.
	f := testforge.New(t, testforge.Config{CertValidity: storeV1Validity})
	seed := sha256.Sum256([]byte(storeV1Seed))
	key, _, err := crypto.GenerateEd25519Key(bytes.NewReader(seed[:]))
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	st, err := storage.Dir(storeV1Store)
	if err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.NewTextHandler(t.Output(), nil))
	h := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, WithStorage(st), WithLogger(logger))
	ev := waitCert(t, h, 30*time.Second)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if ev.Source != Obtained {
		t.Fatalf("certificate event %+v, want one obtained from the forge", ev)
	}

	removeLocks(t, storeV1Store)
	rawKey, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	info, err := json.MarshalIndent(storeV1Info{
		Domain:    f.Domain,
		CAURL:     f.CAURL,
		IssuerKey: issuerKey(f.CAURL),
		PeerID:    id.String(),
		CertName:  f.CertName(id),
		NotBefore: ev.NotBefore.UTC(),
		NotAfter:  ev.NotAfter.UTC(),
	}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, storeV1Identity, rawKey)
	mustWrite(t, storeV1Root, f.IssuerRootPEM)
	mustWrite(t, storeV1Forge, append(info, '\n'))

	// Nothing in the fixture may name this machine's directories (the
	// store's absolute path begins with the working directory).
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	walkFiles(t, storeV1Dir, func(path string, b []byte) {
		if bytes.Contains(b, []byte(wd)) {
			t.Errorf("%s contains the local path %s", path, wd)
		}
		t.Logf("wrote %s (%d bytes)", path, len(b))
	})
	t.Logf("CA URL %s, certificate %s valid until %s", f.CAURL, f.CertName(id), ev.NotAfter.UTC().Format(time.RFC3339))
}

// removeLocks deletes certmagic's lock files (and its locks directory)
// under dir: they are per process and must not be committed.
func removeLocks(t *testing.T, dir string) {
	t.Helper()
	var locks []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(path, ".lock") {
			locks = append(locks, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range locks {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.RemoveAll(filepath.Join(dir, "locks")); err != nil {
		t.Fatal(err)
	}
}

// walkFiles calls fn with the path and contents of every regular file
// under dir.
func walkFiles(t *testing.T, dir string, fn func(path string, b []byte)) {
	t.Helper()
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		fn(path, b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestServeStoreV1: a host given a copy of the store-v1 fixture, its
// identity and the CA URL it was written with serves the stored
// certificate at once, with not one request to the broker, the DNS server
// or the CA. The CA URL's port is bound by this test when it is free, so
// that a connection to the CA is seen rather than merely refused.
//
// The stored chain verifies against root.pem while Pebble's root and
// intermediate are valid: 30 years from not_before in forge.json.
func TestServeStoreV1(t *testing.T) {
	t.Parallel()
	var info storeV1Info
	if err := json.Unmarshal(mustRead(t, storeV1Forge), &info); err != nil {
		t.Fatalf("%s: %v", storeV1Forge, err)
	}
	key, err := crypto.UnmarshalPrivateKey(mustRead(t, storeV1Identity))
	if err != nil {
		t.Fatalf("%s: %v", storeV1Identity, err)
	}
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if id.String() != info.PeerID {
		t.Fatalf("%s is the key of %s, %s says %s", storeV1Identity, id, storeV1Forge, info.PeerID)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(mustRead(t, storeV1Root)) {
		t.Fatalf("%s: no certificate", storeV1Root)
	}
	stored := storedLeaf(t, info)

	dir := filepath.Join(t.TempDir(), "store")
	if err := os.CopyFS(dir, os.DirFS(storeV1Store)); err != nil {
		t.Fatal(err)
	}
	st, err := storage.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	caConns := watchCA(t, info.CAURL)
	// A new forge with the fixture's domain: its broker and DNS server
	// count what the host asks of them. Its CA is not the host's.
	f := testforge.New(t, testforge.Config{Domain: info.Domain})
	var logs logCapture
	// forgeOpts points the host at f; the WithCA after it replaces f's CA
	// by the fixture's.
	fails := &failureLog{}
	h := newHost(t, f, []libp2p.Option{libp2p.Identity(key), fails.option(t)},
		WithStorage(st), WithCA(info.CAURL, nil), WithLogger(logs.logger()))

	ev := waitCert(t, h, 10*time.Second)
	if ev.Source != FromStorage || len(ev.Names) != 1 || ev.Names[0] != info.CertName || !ev.NotAfter.Equal(stored.NotAfter) {
		t.Fatalf("certificate event %+v, want %s until %v from %s", ev, info.CertName, stored.NotAfter, FromStorage)
	}
	addr := waitBrowserAddr(t, h, info.Domain, "/ip4/127.0.0.1/")
	sni := "127-0-0-1." + testforge.PeerLabel(id) + "." + info.Domain
	cs, err := tlsHandshake(tcpHostPort(t, addr), sni, roots)
	if err != nil {
		t.Fatalf("TLS handshake with SNI %s, verified against %s: %v", sni, storeV1Root, err)
	}
	if !cs.PeerCertificates[0].Equal(stored) {
		t.Fatalf("served serial %v, not the stored certificate (serial %v)", cs.PeerCertificates[0].SerialNumber, stored.SerialNumber)
	}
	if evs := fails.all(); len(evs) != 0 {
		t.Errorf("issuance failed: %+v", evs)
	}

	// Once the host is closed, no request of its can be under way.
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if s := f.Stats(); s != (testforge.Stats{}) {
		t.Errorf("forge stats %+v, want no request at all", s)
	}
	if n := caConns(); n != 0 {
		t.Errorf("%d connections to the CA at %s, want none", n, info.CAURL)
	}
	for _, l := range logs.atLeast(slog.LevelWarn) {
		t.Errorf("logged: %s", l.text)
	}
	if t.Failed() {
		t.Logf("the host's log:\n%s", &logs)
	}
}

// storedLeaf returns the leaf certificate of the fixture's store, checking
// that it lies where storeV1Info says.
func storedLeaf(t *testing.T, info storeV1Info) *x509.Certificate {
	t.Helper()
	fst := &certmagic.FileStorage{Path: storeV1Store}
	b := mustRead(t, fst.Filename(certmagic.StorageKeys.SiteCert(info.IssuerKey, info.CertName)))
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("no PEM certificate stored for %s", info.CertName)
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return leaf
}

// watchCA listens on the host and port of caURL, if it can, and returns a
// function that counts the connections accepted so far. A connection is
// closed at once, failing the TLS handshake of whoever made it, so a
// request has reached the count by the time its client has given up.
// When the port is taken, watchCA logs so and the count stays zero; a
// request to the CA then shows only as a warning in the host's log (the
// ACME client logs each failed request at warn level).
func watchCA(t *testing.T, caURL string) (conns func() int) {
	t.Helper()
	u, err := url.Parse(caURL)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", u.Host)
	if err != nil {
		t.Logf("not watching the CA address %s: %v", u.Host, err)
		return func() int { return 0 }
	}
	var n atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed by the cleanup
			}
			n.Add(1)
			_ = c.Close()
		}
	})
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	return func() int { return int(n.Load()) }
}
