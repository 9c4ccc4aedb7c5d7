package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/p2ptls/autotls/internal/certcheck"
	"github.com/p2ptls/autotls/internal/layout"
	"github.com/p2ptls/autotls/storage"
)

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fset := flag.NewFlagSet("status", flag.ContinueOnError)
	var t target
	t.flags(fset)
	if code := parse(fset, &t, args, "Shows what storage holds for the host: its certificate, a pending order,\nits ACME account, the certificates issued lately. No network. Exits 0 when\na valid certificate is stored, 1 when not.", stderr); code >= 0 {
		return code
	}
	valid := status(ctx, &t, time.Now(), func(label, text string) {
		fmt.Fprintf(stdout, "%-12s %s\n", label, text)
	})
	if !valid {
		return 1
	}
	return 0
}

// status prints what storage holds for t, a line per item, and reports
// whether a valid certificate is stored. It only reads.
func status(ctx context.Context, t *target, now time.Time, line func(label, text string)) bool {
	line("storage", t.dir)
	line("peer", t.id.String())
	line("name", t.name)
	line("CA", t.caURL)
	st, err := openExisting(t.dir)
	if err != nil {
		line("certificate", err.Error())
		return false
	}
	c := inspectCert(ctx, st, t, now)
	line("certificate", c.text)
	if c.leaf != nil {
		line("names", strings.Join(c.leaf.DNSNames, ", "))
		line("issuer", c.leaf.Issuer.String())
		line("serial", c.leaf.SerialNumber.Text(16))
	}
	line("pending", inspectPending(ctx, st, t, now))
	line("account", inspectAccount(ctx, st, t))
	line("issued", inspectBudget(ctx, st, t, now))
	return c.valid
}

// openExisting opens the storage directory for reading without creating
// it: status looks, it does not set up.
func openExisting(dir string) (certmagic.Storage, error) {
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("none: %s does not exist (pass -storage if the host stores elsewhere)", dir)
	case err != nil:
		return nil, fmt.Errorf("cannot read the storage: %v", err)
	case !fi.IsDir():
		return nil, fmt.Errorf("cannot read the storage: %s is not a directory", dir)
	}
	return storage.Dir(dir)
}

// certState is the stored certificate as the library would see it.
type certState struct {
	text  string
	leaf  *x509.Certificate // set when the chain parsed and is ours
	valid bool
	none  bool // nothing stored: not yet requested
}

// inspectCert reads and checks the stored pair as the library does at
// start ([certcheck.Check]), and says what the host will do with it.
func inspectCert(ctx context.Context, st certmagic.Storage, t *target, now time.Time) certState {
	var keyPEM []byte
	certPEM, err := st.Load(ctx, layout.CertKey(t.issuer, t.name))
	if err == nil {
		keyPEM, err = st.Load(ctx, layout.PrivateKeyKey(t.issuer, t.name))
		if errors.Is(err, fs.ErrNotExist) {
			return certState{text: "unusable: the certificate's private key is missing; the host moves the certificate aside at its next start and requests a new one"}
		}
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if others := otherIssuers(ctx, st, t); len(others) > 0 {
			return certState{none: true, text: fmt.Sprintf("none stored for this name and CA, but one from another CA (%s); if the host uses that CA, pass its directory URL with -ca", strings.Join(others, ", "))}
		}
		return certState{none: true, text: "none stored for this name and CA; the host requests one once it is publicly reachable"}
	case err != nil:
		return certState{text: fmt.Sprintf("cannot read: %v; the host cannot start serving until storage reads again", err)}
	}
	tc, err := certcheck.Check(certPEM, keyPEM, t.name, now)
	var (
		bad   *certcheck.UnusableError
		exp   *certcheck.ExpiredError
		early *certcheck.NotYetValidError
	)
	switch {
	case err == nil:
		leaf := tc.Leaf
		return certState{leaf: leaf, valid: true, text: fmt.Sprintf("valid until %s (%s left), since %s",
			leaf.NotAfter.UTC().Format(time.RFC3339), left(leaf.NotAfter.Sub(now)), leaf.NotBefore.UTC().Format(time.RFC3339))}
	case errors.As(err, &exp):
		return certState{text: fmt.Sprintf("expired at %s; the host deletes it at its next start and requests a new one", exp.NotAfter.UTC().Format(time.RFC3339))}
	case errors.As(err, &early):
		return certState{text: fmt.Sprintf("not valid before %s; check this machine's clock", early.NotBefore.UTC().Format(time.RFC3339))}
	case errors.As(err, &bad):
		return certState{text: fmt.Sprintf("unusable: %v; the host moves it aside at its next start and requests a new one", bad)}
	}
	return certState{text: fmt.Sprintf("unusable: %v", err)}
}

// otherIssuers returns the issuer keys, other than t's, under which a
// certificate for t's name is stored: a host run with another -ca (such
// as Let's Encrypt's staging CA) keeps its certificate there.
func otherIssuers(ctx context.Context, st certmagic.Storage, t *target) []string {
	dirs, err := st.List(ctx, layout.CertsRoot(), false)
	if err != nil {
		return nil
	}
	var out []string
	for _, d := range dirs {
		issuer := path.Base(d)
		if issuer != t.issuer && st.Exists(ctx, layout.CertKey(issuer, t.name)) {
			out = append(out, issuer)
		}
	}
	sort.Strings(out)
	return out
}

// left is a duration as days, or hours and minutes under a day.
func left(d time.Duration) string {
	if d >= 24*time.Hour {
		return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
	}
	return d.Truncate(time.Minute).String()
}

// inspectPending says what the pending order holds and what the host does
// with it ([layout.PendingOrder]).
func inspectPending(ctx context.Context, st certmagic.Storage, t *target, now time.Time) string {
	raw, err := st.Load(ctx, layout.PendingKey(t.issuer, t.name))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "none"
	case err != nil:
		return fmt.Sprintf("cannot read: %v", err)
	}
	po, _, err := layout.DecodePending(raw)
	if err != nil {
		return fmt.Sprintf("unusable (%v); the next attempt starts afresh", err)
	}
	if po.Chain != "" {
		tc, err := certcheck.Check([]byte(po.Chain), []byte(po.KeyPEM), t.name, now)
		if err != nil {
			return fmt.Sprintf("a downloaded certificate that is not usable (%v); the next attempt starts afresh", err)
		}
		return fmt.Sprintf("a certificate valid until %s, downloaded but not yet stored in place (the host stopped while storing it); the host stores it at its next start, with no request to anyone",
			tc.Leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if po.Order != "" {
		return fmt.Sprintf("order %s in progress when the host stopped; the next attempt resumes it with the same key", po.Order)
	}
	return "a key for an order not yet placed; the next attempt uses it"
}

// inspectAccount says which ACME account the host uses.
func inspectAccount(ctx context.Context, st certmagic.Storage, t *target) string {
	raw, err := st.Load(ctx, layout.AccountKey(t.issuer, t.email))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "none; the host registers one with the CA before its next order"
	case err != nil:
		return fmt.Sprintf("cannot read: %v", err)
	}
	acct, err := layout.DecodeAccount(raw)
	if err != nil {
		return fmt.Sprintf("unusable (%v); the host registers a new one before its next order", err)
	}
	if len(acct.Contact) > 0 {
		return fmt.Sprintf("%s (%s)", acct.Location, strings.Join(acct.Contact, ", "))
	}
	return acct.Location
}

// inspectBudget counts the certificates recorded for the name within the
// CA's window.
func inspectBudget(ctx context.Context, st certmagic.Storage, t *target, now time.Time) string {
	raw, err := st.Load(ctx, layout.BudgetKey(t.issuer, t.name))
	var all []layout.Issuance
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Sprintf("cannot read the record: %v", err)
	default:
		if err := json.Unmarshal(raw, &all); err != nil {
			return fmt.Sprintf("the record is unreadable (%v); the host starts it afresh", err)
		}
	}
	return fmt.Sprintf("%d of %d certificates in the last %d days", len(layout.Recent(all, now)), layout.BudgetLimit, int(layout.BudgetWindow/(24*time.Hour)))
}
