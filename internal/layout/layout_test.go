package layout

import (
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
)

// TestKeys pins the storage keys: hosts and earlier releases sharing a
// storage find each other's certificates only while these stay the same.
// The certificate keys are certmagic's, so that its stores are read too.
func TestKeys(t *testing.T) {
	id, err := peer.Decode("12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf")
	if err != nil {
		t.Fatal(err)
	}
	name := CertName(id, "libp2p.direct")
	issuer := IssuerKey("https://acme-v02.api.letsencrypt.org/directory")
	site := "wildcard_." + PeerLabel(id) + ".libp2p.direct"
	for _, tc := range []struct{ what, got, want string }{
		{"name", name, "*.k51qzi5uqu5diuci8bva7narzo109juvlfbckhzf3j2ljua2979b21rs6uyquk.libp2p.direct"},
		{"issuer", issuer, "acme-v02.api.letsencrypt.org-directory"},
		{"issuer with a port", IssuerKey("https://127.0.0.1:14000/dir"), "127.0.0.1-14000-dir"},
		{"certificates", CertsRoot(), "certificates"},
		{"certificate", CertKey(issuer, name), "certificates/" + issuer + "/" + site + "/" + site + ".crt"},
		{"private key", PrivateKeyKey(issuer, name), "certificates/" + issuer + "/" + site + "/" + site + ".key"},
		{"metadata", MetaKey(issuer, name), "certificates/" + issuer + "/" + site + "/" + site + ".json"},
		{"pending order", PendingKey(issuer, name), "autotls/acme/" + issuer + "/pending/" + site + ".json"},
		{"issuance record", BudgetKey(issuer, name), "autotls/issuance/" + issuer + "/" + site + ".json"},
		{"account", AccountKey(issuer, ""), "autotls/acme/" + issuer + "/accounts/default.json"},
		{"account with email", AccountKey(issuer, "Ops@Example.net"), "autotls/acme/" + issuer + "/accounts/ops@example.net.json"},
		{"issuance lock", IssueLock(name), "issue_cert_" + name},
		{"account lock", AccountLock(issuer), "register_account_" + issuer},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: %q, want %q", tc.what, tc.got, tc.want)
		}
	}
}
