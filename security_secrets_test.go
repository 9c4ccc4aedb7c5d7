package autotls

// Secrets at rest and in logs: key file modes, the access token.

import (
	"bytes"
	"errors"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestSecurityKeyFilePermissions: after a real issuance into storage.Dir,
// every directory of the store is 0700 and every file 0600 (the private
// key, the ACME account with its key, the certificate and its metadata);
// lock files, which hold timestamps only, are gone once issuance ends.
func TestSecurityKeyFilePermissions(t *testing.T) {
	t.Parallel()
	f := startForge(t, testforge.Config{})
	dir := filepath.Join(t.TempDir(), "nested", "store")
	st, err := storage.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	h := newHost(t, f, nil, WithStorage(st))
	waitCert(t, h, 30*time.Second)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	var keys int
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		mode := info.Mode().Perm()
		switch {
		case d.IsDir() && mode != 0o700:
			t.Errorf("directory %s has mode %v, want 0700", path, mode)
		case d.IsDir():
		case strings.HasSuffix(path, ".lock"):
			t.Errorf("lock file %s left after issuance", path)
		case mode != 0o600:
			t.Errorf("file %s has mode %v, want 0600", path, mode)
		}
		if !d.IsDir() {
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			if bytes.Contains(b, []byte("PRIVATE KEY")) {
				keys++
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if keys < 2 {
		t.Fatalf("%d files with a private key, want the certificate's and the ACME account's", keys)
	}
}

// TestSecurityAccessTokenNotLogged: with a forge that requires an access
// token, a host with a wrong token fails (403) and a host with the right
// one succeeds; with the logger at debug level (acmez's lines included),
// neither token appears in any log line or failure event,
// not even when the broker echoes the token back in its error body.
func TestSecurityAccessTokenNotLogged(t *testing.T) {
	t.Parallel()
	const good, wrong = "tok-good-5a1f8c0e93d2", "tok-wrong-77b3e410c6aa"
	f := startForge(t, testforge.Config{AccessToken: good})
	run := func(t *testing.T, token string, echo bool) (*logCapture, *EvtIssuanceFailed) {
		if echo {
			f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
				if r.URL.Path != registerPath || r.Header.Get(testforge.ForgeAuthHeader) == "" {
					return false
				}
				http.Error(w, "403 Forbidden: token "+r.Header.Get(testforge.ForgeAuthHeader)+" revoked", http.StatusForbidden)
				return true
			})
			defer f.SetBrokerFault(nil)
		}
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(time.Minute))
		r := startRig(t, f, clk, nil, nil, WithAccessToken(token), WithStorage(storage.Memory()))
		if token == good && !echo {
			r.waitLoaded(t)
			return r.logs, nil
		}
		clk.WaitParked(t, 30*time.Second)
		ev := r.fails.last(t)
		return r.logs, &ev
	}
	for _, tc := range []struct {
		name  string
		token string
		echo  bool
	}{
		{"wrong token", wrong, false},
		{"right token", good, false},
		{"token echoed by the broker", good, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logs, failed := run(t, tc.token, tc.echo)
			text := logs.String()
			// The check reads every level: debug lines (the ACME client's
			// requests among them) must be there.
			if n := len(logs.all()) - len(logs.atLeast(slog.LevelInfo)); n < 3 {
				t.Fatalf("only %d log lines captured at debug level", n)
			}
			if failed != nil {
				text += failed.Err.Error()
				var be *BrokerError
				if !errors.As(failed.Err, &be) || be.StatusCode != http.StatusForbidden {
					t.Errorf("failure %v, want the broker's 403", failed.Err)
				}
				if tc.echo && !strings.Contains(be.Body, "[redacted]") {
					t.Errorf("the broker's echo of the token is not in the error, redacted: %q", be.Body)
				}
			}
			for _, tok := range []string{good, wrong} {
				if strings.Contains(text, tok) {
					t.Errorf("token %q logged", tok)
				}
			}
		})
	}
}
