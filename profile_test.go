package autotls

// ACME profiles: WithProfile checked against the CA's directory, renewal
// timed to the lifetime of the certificate a profile gives, and challenge
// types the client does not use left alone. The rig and its conventions
// are those of the fault tests (rig_test.go).

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/mholt/acmez/v3/acme"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

func TestWithProfileOption(t *testing.T) {
	for _, tc := range []struct {
		name, profile string
		ok            bool
	}{
		{"Let's Encrypt's short-lived", "shortlived", true},
		{"any token", "tls-server_2", true},
		{"empty", "", false},
		{"space", "short lived", false},
		{"newline", "shortlived\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := newConfig([]Opt{WithStorage(storage.Memory()), WithProfile(tc.profile)})
			switch {
			case tc.ok && err != nil:
				t.Fatalf("WithProfile(%q): %v", tc.profile, err)
			case tc.ok && c.profile != tc.profile:
				t.Fatalf("profile %q, want %q", c.profile, tc.profile)
			case !tc.ok && err == nil:
				t.Fatalf("WithProfile(%q) accepted", tc.profile)
			case !tc.ok && !strings.Contains(err.Error(), "WithProfile") || !tc.ok && !strings.Contains(err.Error(), "CA's default"):
				t.Fatalf("error %q does not name the option and its default", err)
			}
		})
	}
	c, err := newConfig([]Opt{WithStorage(storage.Memory())})
	if err != nil || c.profile != "" {
		t.Fatalf("without WithProfile: profile %q, err %v; want none (the CA's default)", c.profile, err)
	}
}

func TestProfileOffered(t *testing.T) {
	le := &acme.DirectoryMeta{Profiles: map[string]string{
		"classic": "90 days", "tlsserver": "45 days", "shortlived": "6 days",
	}}
	for _, tc := range []struct {
		name    string
		profile string
		meta    *acme.DirectoryMeta
		want    string // "" for offered
	}{
		{"offered", "shortlived", le, ""},
		{"unknown", "shortlive", le, `WithProfile("shortlive"): the CA offers no such ACME profile; it offers classic, shortlived, tlsserver`},
		{"case matters", "Classic", le, `it offers classic, shortlived, tlsserver`},
		{"no meta", "shortlived", nil, `WithProfile("shortlived"): the CA lists no ACME profiles`},
		{"no profiles", "shortlived", &acme.DirectoryMeta{}, `the CA lists no ACME profiles in its directory; remove WithProfile`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := profileOffered(tc.profile, tc.meta)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			var pe *profileError
			if !errors.As(err, &pe) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want a *profileError saying %q", err, tc.want)
			}
			f := classify(&caError{ca: "https://ca.example/dir", err: err}, time.Now())
			if !f.permanent || f.key != "ca profile" || !strings.Contains(f.sentence, tc.want) {
				t.Fatalf("classified as %+v: want permanent, keyed \"ca profile\", saying %q", f, tc.want)
			}
		})
	}
}

// freshURL returns ca's directory URL made unique to this call (the CA
// ignores the query). acmez caches directories by URL for the whole
// process, for 12 hours: a proxy listening on a port that an earlier
// test's proxy used would be read from that cache, with the earlier
// forge's profiles or the earlier test's directory edits.
func freshURL(t *testing.T, ca *testforge.CAProxy) string {
	return ca.URL + "?test=" + url.QueryEscape(fmt.Sprintf("%s-%d", t.Name(), time.Now().UnixNano()))
}

// serveDirectory makes ca answer GET /dir with the CA's directory as edit
// leaves it, and pass every other request to next (nil: to the CA).
func serveDirectory(t *testing.T, ca *testforge.CAProxy, edit func(dir map[string]any), next func(w http.ResponseWriter, r *http.Request) bool) {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Roots}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(ca.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var dir map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&dir); err != nil {
		t.Fatal(err)
	}
	edit(dir)
	body, err := json.Marshal(dir)
	if err != nil {
		t.Fatal(err)
	}
	ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodGet && r.URL.Path == "/dir" {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(body)
			return true
		}
		return next != nil && next(w, r)
	})
}

// TestProfileNotOffered: a profile the CA does not offer, or a CA that
// offers none, is a misconfiguration. The host reads the CA's directory
// once, says so in one warning naming the profile and what the CA offers,
// registers no account, sends the broker no challenge and orders nothing,
// and tries again only hours later: a day costs the CA one request.
func TestProfileNotOffered(t *testing.T) {
	f := startForge(t, testforge.Config{Profiles: map[string]time.Duration{
		"classic": 90 * 24 * time.Hour, "shortlived": 6 * 24 * time.Hour,
	}})
	for _, tc := range []struct {
		name    string
		profile string
		noneAt  bool // the CA's directory lists no profiles
		want    []string
	}{
		{"unknown profile", "shortlivd", false, []string{`WithProfile("shortlivd")`, "no such ACME profile", "it offers classic, shortlived", "remove WithProfile"}},
		{"CA without profiles", "shortlived", true, []string{`WithProfile("shortlived")`, "lists no ACME profiles", "remove WithProfile"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			ca := startCAProxy(t, f)
			if tc.noneAt {
				serveDirectory(t, ca, func(dir map[string]any) { delete(dir["meta"].(map[string]any), "profiles") }, nil)
			}
			clk := newClockAtNow()
			start := clk.Now()
			clk.SetHorizon(start.Add(24 * time.Hour))
			before, seen := f.Stats(), len(ca.Requests())
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(freshURL(t, ca), ca.Roots), WithProfile(tc.profile))
			r.closers = append(r.closers, ca.Close)
			clk.WaitParked(t, 30*time.Second)

			ev := r.fails.last(t)
			var pe *profileError
			if !errors.As(ev.Err, &pe) || pe.name != tc.profile {
				t.Fatalf("failure %v, want the profile %q refused", ev.Err, tc.profile)
			}
			w := warnings(r)
			if len(w) != 1 {
				t.Fatalf("%d warnings in a day, want 1:\n%s", len(w), r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			for _, want := range tc.want {
				if !strings.Contains(w[0].msg, want) {
					t.Errorf("the warning does not say %q", want)
				}
			}
			attempts := len(r.fails.all())
			for i, d := range r.retries() {
				if d < retryCap*9/10 {
					t.Errorf("retry %d after %v: a misconfiguration is retried hours later, not sooner than %v", i+1, d, retryCap*9/10)
				}
			}
			reqs := ca.Requests()[seen:]
			if len(reqs) != 1 || reqs[0].Method != http.MethodGet || reqs[0].Path != "/dir" {
				t.Errorf("the CA received %d requests in a day (%+v), want its directory read once", len(reqs), reqs)
			}
			after := f.Stats()
			if n := after.Challenge - before.Challenge; n != 0 {
				t.Errorf("%d challenge requests to the broker, want none", n)
			}
			t.Logf("a day of WithProfile(%q): %d attempts, %d CA request(s), %d broker health checks",
				tc.profile, attempts, len(reqs), after.Health-before.Health)
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
	}
}

// TestProfileNotOfferedStored: a host restarted with a valid stored
// certificate and a profile the CA does not offer hears of it at its
// first contact with the CA, the poll of the renewal information, weeks
// before the renewal: one warning, no order.
func TestProfileNotOfferedStored(t *testing.T) {
	f := startForge(t, testforge.Config{Profiles: map[string]time.Duration{"classic": 90 * 24 * time.Hour}})
	leaks := leakCheck(t)
	key := genKey(t, crypto.Ed25519)
	st := storage.Memory()
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute))
	ca := startCAProxy(t, f)
	caURL := freshURL(t, ca) // the same for both hosts: storage is kept per CA URL
	first := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st), WithCA(caURL, ca.Roots))
	first.waitLoaded(t)
	first.close(t)

	before := len(ca.Requests())
	clk = newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Hour))
	r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, func(m *manager) { m.ariFirstPoll = time.Second },
		WithStorage(st), WithCA(caURL, ca.Roots), WithProfile("shortlived"))
	r.closers = append(r.closers, ca.Close)
	if ev := waitCert(t, r.h, 30*time.Second); ev.Source != FromStorage {
		t.Fatalf("certificate %s, want the stored one", ev.Source)
	}
	clk.WaitParked(t, 30*time.Second)
	w := warnings(r)
	if len(w) != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
	}
	t.Logf("the operator reads: %s", w[0].text)
	for _, want := range []string{"next renewal will fail", `WithProfile("shortlived")`, "it offers classic"} {
		if !strings.Contains(w[0].msg, want) {
			t.Errorf("the warning does not say %q", want)
		}
	}
	reqs := ca.Requests()[before:]
	if n := count(reqs, http.MethodPost, "/order-plz"); n != 0 || len(reqs) == 0 {
		t.Errorf("%d requests to the CA, %d orders: want the renewal-information poll only", len(reqs), n)
	}
	r.closeAndCheck(t, leaks)
}

// TestProfileRenewal: certificates of ACME profiles with short lifetimes,
// issued by Pebble, are renewed at the time their lifetime calls for, on
// the fake clock: without renewal information (ARI) from the CA, with
// half the lifetime left under ten days and a third left otherwise; with
// the CA's ARI, inside the window it suggests. The renewal is a real
// second order and a second certificate from Pebble, served.
func TestProfileRenewal(t *testing.T) {
	const day = 24 * time.Hour
	f := startForge(t, testforge.Config{Profiles: map[string]time.Duration{
		"classic":    90 * day,
		"tlsserver":  45 * day,
		"shortlived": 6 * day,
		"minutes":    20 * time.Minute,
	}})
	for _, tc := range []struct {
		name     string
		profile  string
		validity time.Duration
		ari      bool // the CA offers renewal information
		left     int  // without ARI: renewal with 1/left of the lifetime left
	}{
		{"shortlived 6 days", "shortlived", 6 * day, false, 2},
		{"20 minutes", "minutes", 20 * time.Minute, false, 2},
		{"tlsserver 45 days", "tlsserver", 45 * day, false, 3},
		{"shortlived 6 days with ARI", "shortlived", 6 * day, true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			ca := startCAProxy(t, f)
			clk := newClockAtNow()
			// When each order reached the CA, on the host's clock. Orders
			// after the renewal are held until the host closes: the
			// renewed certificate, from Pebble's real clock, is due at
			// once on the fake one.
			var mu sync.Mutex
			var orders []time.Time
			onOrder := func(w http.ResponseWriter, r *http.Request) bool {
				if r.Method != http.MethodPost || r.URL.Path != "/order-plz" {
					return false
				}
				mu.Lock()
				orders = append(orders, clk.Now())
				n := len(orders)
				mu.Unlock()
				if n <= 2 {
					return false
				}
				<-r.Context().Done()
				w.WriteHeader(http.StatusServiceUnavailable)
				return true
			}
			if tc.ari {
				ca.SetFault(onOrder)
			} else {
				serveDirectory(t, ca, func(dir map[string]any) { delete(dir, "renewalInfo") }, onOrder)
			}
			clk.SetHorizon(clk.Now().Add(time.Minute))
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(freshURL(t, ca), ca.Roots), WithProfile(tc.profile))
			r.closers = append(r.closers, ca.Close)

			served := r.waitLoaded(t)
			first := served.leaf
			life := first.NotAfter.Sub(first.NotBefore)
			// Pebble's NotAfter is NotBefore + validity - 1 s.
			if life != tc.validity-time.Second {
				t.Fatalf("certificate of profile %q lives %v, want %v", tc.profile, life, tc.validity-time.Second)
			}
			var lo, hi time.Time
			if tc.ari {
				lo, hi = pebbleRenewalWindow(t, f, first)
			} else {
				lo = first.NotAfter.Add(-life / time.Duration(tc.left))
				hi = lo.Add(time.Second)
			}
			clk.SetHorizon(hi.Add(time.Minute))
			second := r.waitRenewed(t, served).leaf

			mu.Lock()
			renewedAt := orders[1]
			mu.Unlock()
			if renewedAt.Before(lo) || renewedAt.After(hi) {
				t.Errorf("renewed at %v (%.3f of the lifetime), want between %v and %v",
					renewedAt.Sub(first.NotBefore), float64(renewedAt.Sub(first.NotBefore))/float64(life), lo.Sub(first.NotBefore), hi.Sub(first.NotBefore))
			}
			if second.SerialNumber.Cmp(first.SerialNumber) == 0 || second.NotAfter.Sub(second.NotBefore) != life {
				t.Fatalf("renewed certificate %x living %v, want a new one of the same profile", second.SerialNumber, second.NotAfter.Sub(second.NotBefore))
			}
			if got := servedSerial(t, r); got != second.SerialNumber.String() {
				t.Fatalf("a WSS handshake gets serial %q, want the renewed %s", got, second.SerialNumber)
			}
			t.Logf("profile %q (%v): renewed after %v, %.3f of the lifetime", tc.profile, tc.validity,
				renewedAt.Sub(first.NotBefore).Round(time.Second), float64(renewedAt.Sub(first.NotBefore))/float64(life))
			r.closeAndCheck(t, leaks)
		})
	}
}

// pebbleRenewalWindow asks Pebble's ARI endpoint for leaf's suggested
// renewal window.
func pebbleRenewalWindow(t *testing.T, f *testforge.Forge, leaf *x509.Certificate) (start, end time.Time) {
	t.Helper()
	hc := f.CAClient()
	defer hc.CloseIdleConnections()
	get := func(url string, v any) {
		resp, err := hc.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s %s", url, resp.Status, body)
		}
		if err := json.Unmarshal(body, v); err != nil {
			t.Fatal(err)
		}
	}
	var dir acme.Directory
	get(f.CAURL, &dir)
	id, err := acme.ARIUniqueIdentifier(leaf)
	if err != nil {
		t.Fatal(err)
	}
	var ri acme.RenewalInfo
	get(strings.TrimSuffix(dir.RenewalInfo, "/")+"/"+id, &ri)
	return ri.SuggestedWindow.Start, ri.SuggestedWindow.End
}

// TestUnusedChallengeTypes: Pebble, like Let's Encrypt, offers challenge
// types for a wildcard name that this client does not use (dns-account-01,
// dns-persist-01) beside dns-01. Issuance answers dns-01 and leaves the
// others untouched.
func TestUnusedChallengeTypes(t *testing.T) {
	f := startForge(t, testforge.Config{})
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute))
	r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()))
	leaf := r.waitLoaded(t).leaf

	chals, err := f.Challenges(leaf)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the CA offered: %+v", chals)
	var types []string
	for _, c := range chals {
		types = append(types, c.Type)
		want := "pending" // never answered
		if c.Type == acme.ChallengeTypeDNS01 {
			want = "valid"
		}
		if c.Status != want {
			t.Errorf("challenge %s is %s, want %s", c.Type, c.Status, want)
		}
	}
	for _, want := range []string{acme.ChallengeTypeDNS01, "dns-account-01", "dns-persist-01"} {
		if !slices.Contains(types, want) {
			t.Errorf("the CA did not offer %s (offered %v): the test no longer shows what it is for", want, types)
		}
	}
}
