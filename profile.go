package autotls

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/mholt/acmez/v3/acme"
)

// ACME profiles (draft-ietf-acme-profiles): a CA lists the profiles it
// offers in its directory's meta.profiles, and an order may name one. A
// client must not name a profile the CA does not list. WithProfile's name
// is checked here, at the first request of an issuance, since a
// misspelled name is known from the directory alone, before an account is
// registered or a challenge is sent to the broker; it is not checked at
// the host's start, which must not wait for the CA, nor before the
// reachability gate, before which nothing is sent. A host that starts with
// a valid stored certificate first contacts the CA for its renewal
// information, and has the name checked then.

// profileError: the CA does not offer the profile WithProfile names. It is
// a misconfiguration: classify makes it permanent, so that the next
// attempt comes hours later (and reads the directory acmez keeps, not the
// CA).
type profileError struct {
	name    string
	offered []string // sorted; empty when the CA lists no profiles
}

func (e *profileError) Error() string {
	if len(e.offered) == 0 {
		return fmt.Sprintf("WithProfile(%q): the CA lists no ACME profiles in its directory; remove WithProfile to get its default certificate", e.name)
	}
	return fmt.Sprintf("WithProfile(%q): the CA offers no such ACME profile; it offers %s: name one of them, or remove WithProfile for the CA's default", e.name, strings.Join(e.offered, ", "))
}

// checkProfile reads the CA's directory (acmez fetches it once per
// client) and checks that the profile asked for is offered. Without a
// profile it sends nothing.
func (i *issuer) checkProfile(ctx context.Context) error {
	if i.profile == "" {
		return nil
	}
	dir, err := i.client.GetDirectory(ctx)
	if err != nil {
		return fmt.Errorf("reading the CA's directory: %w", err)
	}
	return profileOffered(i.profile, dir.Meta)
}

// checkProfileEarly checks WithProfile's name at the first poll of the
// CA's renewal information for a certificate: for a host that starts with
// a valid stored certificate, its first contact with the CA. A name the CA
// does not offer is said then, once, rather than weeks later when the
// renewal fails on it. It costs no request: the poll reads the directory
// anyway.
func (m *manager) checkProfileEarly(ctx context.Context, s *ariState) {
	if s.profileSaid {
		return
	}
	s.profileSaid = true
	var pe *profileError
	if err := m.issuer.checkProfile(ctx); errors.As(err, &pe) {
		m.log.Warn("the next renewal will fail: "+pe.Error(), "kind", string(kindCA), "not_after", s.leaf.NotAfter.Format(time.RFC3339))
	}
}

// profileOffered checks name against the profiles a directory's meta
// lists.
func profileOffered(name string, meta *acme.DirectoryMeta) error {
	var offered []string
	if meta != nil {
		for p := range meta.Profiles {
			offered = append(offered, p)
		}
	}
	if slices.Contains(offered, name) {
		return nil
	}
	slices.Sort(offered)
	return &profileError{name: name, offered: offered}
}
