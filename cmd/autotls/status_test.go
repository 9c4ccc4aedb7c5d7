package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/p2ptls/autotls/internal/layout"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// statusArgs are the flags that point status at is on f.
func statusArgs(f *testforge.Forge, is issued, extra ...string) []string {
	return append([]string{"status", "-storage", is.dir, "-identity", is.keyFile, "-forge", f.Domain, "-ca", f.CAURL}, extra...)
}

// head is the first four lines of status for is on f.
func head(f *testforge.Forge, is issued) []string {
	return []string{
		"storage      " + is.dir,
		"peer         " + is.id.String(),
		"name         " + f.CertName(is.id),
		"CA           " + f.CAURL,
	}
}

// certLines are status's lines for the certificate is.leaf, valid.
func certLines(f *testforge.Forge, is issued) []string {
	return []string{
		fmt.Sprintf("certificate  valid until %s (89d left), since %s", is.leaf.NotAfter.UTC().Format(time.RFC3339), is.leaf.NotBefore.UTC().Format(time.RFC3339)),
		"names        " + f.CertName(is.id),
		"issuer       " + is.leaf.Issuer.String(),
		"serial       " + is.leaf.SerialNumber.Text(16),
	}
}

// accountLocation is the account the host registered, as Pebble named it.
func accountLocation(t *testing.T, is issued, f *testforge.Forge) string {
	t.Helper()
	raw, err := os.ReadFile(storePath(is.dir, layout.AccountKey(layout.IssuerKey(f.CAURL), "")))
	if err != nil {
		t.Fatal(err)
	}
	var a layout.Account
	if err := json.Unmarshal(raw, &a); err != nil {
		t.Fatal(err)
	}
	return a.Location
}

// TestStatus: after a real issuance, status shows the certificate the
// host served (names, validity, issuer, serial), no pending order, the
// account the host registered and one issuance; named by key file or by
// PeerID alike. On damaged storage it says what is wrong and what the
// host will do.
func TestStatus(t *testing.T) {
	f := testforge.New(t, testforge.Config{})
	is := issue(t, f)
	acct := accountLocation(t, is, f)
	valid := lines(append(append(head(f, is), certLines(f, is)...),
		"pending      none",
		"account      "+acct,
		"issued       1 of 5 certificates in the last 7 days")...)

	t.Run("identity file", func(t *testing.T) {
		out, code := cmd(t, statusArgs(f, is)...)
		checkOutput(t, out, code, valid, 0)
	})
	t.Run("PeerID", func(t *testing.T) {
		out, code := cmd(t, "status", "-storage", is.dir, "-peer", is.id.String(), "-forge", f.Domain, "-ca", f.CAURL)
		checkOutput(t, out, code, valid, 0)
	})
	t.Run("another CA", func(t *testing.T) {
		out, code := cmd(t, statusArgs(f, is, "-ca", "https://ca.invalid/dir")...)
		h := head(f, is)
		h[3] = "CA           https://ca.invalid/dir"
		checkOutput(t, out, code, lines(append(h,
			"certificate  none stored for this name and CA, but one from another CA ("+layout.IssuerKey(f.CAURL)+"); if the host uses that CA, pass its directory URL with -ca",
			"pending      none",
			"account      none; the host registers one with the CA before its next order",
			"issued       0 of 5 certificates in the last 7 days")...), 1)
	})
	t.Run("no storage", func(t *testing.T) {
		missing := is
		missing.dir = filepath.Join(t.TempDir(), "nothing")
		out, code := cmd(t, statusArgs(f, missing)...)
		checkOutput(t, out, code, lines(append(head(f, missing),
			"certificate  none: "+missing.dir+" does not exist (pass -storage if the host stores elsewhere)")...), 1)
		if _, err := os.Stat(missing.dir); err == nil {
			t.Error("status created the storage directory")
		}
	})

	ik := layout.IssuerKey(f.CAURL)
	name := f.CertName(is.id)
	t.Run("truncated certificate", func(t *testing.T) {
		d := copyStore(t, is)
		p := storePath(d.dir, layout.CertKey(ik, name))
		chain, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		// Cut inside the last block, as a full disk or a crash leaves it.
		if err := os.WriteFile(p, chain[:len(chain)-40], 0o600); err != nil {
			t.Fatal(err)
		}
		out, code := cmd(t, statusArgs(f, d)...)
		checkOutput(t, out, code, lines(append(head(f, d),
			"certificate  unusable: certificate chain: block 2 of 2 is truncated; the host moves it aside at its next start and requests a new one",
			"pending      none",
			"account      "+acct,
			"issued       1 of 5 certificates in the last 7 days")...), 1)
	})
	t.Run("key missing", func(t *testing.T) {
		d := copyStore(t, is)
		if err := os.Remove(storePath(d.dir, layout.PrivateKeyKey(ik, name))); err != nil {
			t.Fatal(err)
		}
		out, code := cmd(t, statusArgs(f, d)...)
		checkOutput(t, out, code, lines(append(head(f, d),
			"certificate  unusable: the certificate's private key is missing; the host moves the certificate aside at its next start and requests a new one",
			"pending      none",
			"account      "+acct,
			"issued       1 of 5 certificates in the last 7 days")...), 1)
	})
	t.Run("account missing", func(t *testing.T) {
		d := copyStore(t, is)
		if err := os.Remove(storePath(d.dir, layout.AccountKey(ik, ""))); err != nil {
			t.Fatal(err)
		}
		out, code := cmd(t, statusArgs(f, d)...)
		checkOutput(t, out, code, lines(append(append(head(f, d), certLines(f, d)...),
			"pending      none",
			"account      none; the host registers one with the CA before its next order",
			"issued       1 of 5 certificates in the last 7 days")...), 0)
	})
	t.Run("read-only storage", func(t *testing.T) {
		d := copyStore(t, is)
		readOnly(t, d.dir)
		out, code := cmd(t, statusArgs(f, d)...)
		checkOutput(t, out, code, lines(append(append(head(f, d), certLines(f, d)...),
			"pending      none",
			"account      "+acct,
			"issued       1 of 5 certificates in the last 7 days")...), 0)
	})
	t.Run("account unusable", func(t *testing.T) {
		d := copyStore(t, is)
		if err := os.WriteFile(storePath(d.dir, layout.AccountKey(ik, "")), []byte(`{"location":""}`), 0o600); err != nil {
			t.Fatal(err)
		}
		out, code := cmd(t, statusArgs(f, d)...)
		checkOutput(t, out, code, lines(append(append(head(f, d), certLines(f, d)...),
			"pending      none",
			"account      unusable (no key or location); the host registers a new one before its next order",
			"issued       1 of 5 certificates in the last 7 days")...), 0)
	})

	// Pending orders, as the library leaves them when stopped at each
	// stage of an issuance.
	keyPEM := func(t *testing.T) string {
		k, err := certmagic.PEMEncodePrivateKey(mustKey(t))
		if err != nil {
			t.Fatal(err)
		}
		return string(k)
	}
	certPEM, err := os.ReadFile(storePath(is.dir, layout.CertKey(ik, name)))
	if err != nil {
		t.Fatal(err)
	}
	certKeyPEM, err := os.ReadFile(storePath(is.dir, layout.PrivateKeyKey(ik, name)))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		po   layout.PendingOrder
		raw  string // instead of po
		want string
	}{
		{"before the order", layout.PendingOrder{KeyPEM: keyPEM(t)}, "",
			"a key for an order not yet placed; the next attempt uses it"},
		{"order placed", layout.PendingOrder{KeyPEM: keyPEM(t), Order: f.CAURL + "/my-order/x"}, "",
			"order " + f.CAURL + "/my-order/x in progress when the host stopped; the next attempt resumes it with the same key"},
		{"chain downloaded", layout.PendingOrder{KeyPEM: string(certKeyPEM), Order: f.CAURL + "/my-order/x", Chain: string(certPEM)}, "",
			"a certificate valid until " + is.leaf.NotAfter.UTC().Format(time.RFC3339) + ", downloaded but not yet stored in place (the host stopped while storing it); the host stores it at its next start, with no request to anyone"},
		{"chain of another key", layout.PendingOrder{KeyPEM: keyPEM(t), Chain: string(certPEM)}, "",
			"a downloaded certificate that is not usable (private key does not match the leaf's ECDSA public key); the next attempt starts afresh"},
		{"torn record", layout.PendingOrder{}, `{"private_key_pem":"-----BEGIN`,
			"unusable (decoding the pending order: unexpected end of JSON input); the next attempt starts afresh"},
	} {
		t.Run("pending "+tc.name, func(t *testing.T) {
			d := copyStore(t, is)
			raw := []byte(tc.raw)
			if tc.raw == "" {
				raw, _ = json.Marshal(tc.po)
			}
			st, err := storage.Dir(d.dir)
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Store(t.Context(), layout.PendingKey(ik, name), raw); err != nil {
				t.Fatal(err)
			}
			out, code := cmd(t, statusArgs(f, d)...)
			checkOutput(t, out, code, lines(append(append(head(f, d), certLines(f, d)...),
				"pending      "+tc.want,
				"account      "+acct,
				"issued       1 of 5 certificates in the last 7 days")...), 0)
		})
	}
}
