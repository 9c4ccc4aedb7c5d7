package autotls

// Compatibility with storage written by earlier releases. testdata/store-v1
// is a storage directory written by the release before the core was
// rebuilt (TestGenerateStoreV1Fixture made it).

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
