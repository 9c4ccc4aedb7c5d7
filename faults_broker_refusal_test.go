package autotls

// Fault tests of a broker that refuses what a retry cannot mend: its
// dial-back fails (the node is not reachable), it forbids (403), or it
// redirects. Each needs a change on the node's side first, so the manager
// says what to change, once, and retries no sooner than a floor (the
// dial-back) or hours later (the others), never in the seconds of the
// transient backoff. The rig and its conventions are those of
// faults_broker_test.go.

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// deadTCPAddr returns a loopback TCP address on which nothing listens.
func deadTCPAddr(t *testing.T) ma.Multiaddr {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port))
}

// TestFaultBrokerUnreachable: the broker's real dial-back fails (the host
// announces an address nothing listens on, as behind a closed port), so
// it answers 400 "error testing addresses". The warning says the node is
// not reachable from outside and what to check; retries are no sooner
// than unreachableFloor apart, jitter included, never the seconds of the
// transient backoff; once the address is right, the next retry succeeds.
func TestFaultBrokerUnreachable(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	dead := deadTCPAddr(t)
	var closed atomic.Bool
	closed.Store(true)
	factory := func(in []ma.Multiaddr) []ma.Multiaddr {
		if closed.Load() {
			return []ma.Multiaddr{dead}
		}
		return in
	}
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(2 * time.Hour))
	r := startRig(t, f, clk, []libp2p.Option{libp2p.AddrsFactory(factory)}, nil, WithStorage(storage.Memory()))
	clk.WaitParked(t, 30*time.Second)

	ev := r.fails.last(t)
	var be *BrokerError
	if !errors.As(ev.Err, &be) || !be.Unreachable() || !strings.Contains(be.Body, "error testing addresses") {
		t.Fatalf("failure %v, want the broker's 400 \"error testing addresses\"", ev.Err)
	}
	waits := r.retries()
	for i, w := range waits {
		if w < unreachableFloor {
			t.Errorf("retry %d after %v: a tight retry cannot help an unreachable node (want ≥ %v)", i+1, w, unreachableFloor)
		}
	}
	if len(waits) > int(2*time.Hour/unreachableFloor)+1 {
		t.Errorf("%d attempts in 2 h", len(waits))
	}
	w := warnings(r)
	if len(w) != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
	}
	t.Logf("the operator reads: %s", w[0].text)
	for _, want := range []string{"dial this node back", "reachable from the internet", "port forwarding", "firewall", "error testing addresses"} {
		if !strings.Contains(w[0].text, want) {
			t.Errorf("the warning does not say %q", want)
		}
	}
	pingOverTCP(t, f, r.h)

	closed.Store(false) // the port is forwarded now
	clk.SetHorizon(clk.Now().Add(retryCap))
	r.waitLoaded(t)
	r.closeAndCheck(t, leaks)
}

// TestFaultBrokerForbidden: a 403 (a missing or wrong access token, or an
// address on the broker's denylist) is not retried soon: the warning says
// refused, 403, and to check the token or the denylist; the next attempt
// is hours away (at least 0.9 × retryCap), so a day costs a handful of
// requests; a host restarted with the right token succeeds.
func TestFaultBrokerForbidden(t *testing.T) {
	const token = "tok-7d1e-correct-horse"
	f := startForge(t, testforge.Config{AccessToken: token})
	for _, tc := range []struct {
		name  string
		opts  []Opt
		fault func(w http.ResponseWriter, r *http.Request) bool
	}{
		{name: "missing token"},
		{name: "wrong token", opts: []Opt{WithAccessToken("tok-wrong-battery-staple")}},
		// The test broker has no denylist (its checks are the public
		// broker's otherwise): a fake answer with the public broker's
		// status and body (protocol §2.4 step 9).
		{name: "denylisted", opts: []Opt{WithAccessToken(token)}, fault: func(w http.ResponseWriter, r *http.Request) bool {
			if r.URL.Path != registerPath {
				return false
			}
			http.Error(w, "403 Forbidden: client IP 127.0.0.1 blocked by spamhaus-drop", http.StatusForbidden)
			return true
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			f.SetBrokerFault(tc.fault)
			defer f.SetBrokerFault(nil)
			before := f.Stats()
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(24 * time.Hour))
			r := startRig(t, f, clk, nil, nil, append(tc.opts, WithStorage(storage.Memory()))...)
			clk.WaitParked(t, 30*time.Second)

			waits := r.retries()
			for i, w := range waits {
				if w < retryCap*9/10 {
					t.Errorf("retry %d after %v; a refusal needs a change first (want ≥ %v)", i+1, w, retryCap*9/10)
				}
			}
			used := f.Stats()
			reqs := used.Health + used.Challenge - before.Health - before.Challenge
			t.Logf("a day of 403s: %d attempts, %d broker requests", len(waits), reqs)
			if len(waits) > 9 {
				t.Errorf("%d attempts in a day", len(waits))
			}
			w := warnings(r)
			if len(w) != 1 {
				t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			for _, want := range []string{"refused", "403", "access token", "denylisted"} {
				if !strings.Contains(w[0].text, want) {
					t.Errorf("the warning does not say %q", want)
				}
			}
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
	}
	t.Run("restart with the token", func(t *testing.T) {
		leaks := leakCheck(t)
		r := startRig(t, f, newClockAtNow(), nil, nil, WithAccessToken(token), WithStorage(storage.Memory()))
		r.waitLoaded(t)
		r.closeAndCheck(t, leaks)
	})
}

// TestFaultBrokerRedirect: a broker (or a proxy in front of it) that
// answers 302 or 307 with a Location on another loopback server, on the
// health check, on the registration's first request, or only on the
// request that completes the PeerID handshake (the one carrying the
// node's signature). The redirect is never followed: the other server
// receives nothing at all, so neither the access token nor a PeerID-auth
// header can reach it. Only a change of configuration can help, so the
// one warning says what to set (WithRegistrationEndpoint), and each next
// attempt comes hours later (the cap, with jitter), as the redirected
// requests' times on the fake clock show. No certificate is served.
func TestFaultBrokerRedirect(t *testing.T) {
	const token = "tok-5c2e-follow-me-not"
	f := startForge(t, testforge.Config{AccessToken: token})
	for _, status := range []int{http.StatusFound, http.StatusTemporaryRedirect} {
		for _, place := range []struct {
			name string
			path string
			// signed: only the request carrying the node's handshake
			// signature is redirected.
			signed bool
		}{
			{"health", healthPath, false},
			{"registration", registerPath, false},
			{"registration, completing the handshake", registerPath, true},
		} {
			t.Run(fmt.Sprintf("%d on %s", status, place.name), func(t *testing.T) {
				target, targetLog := newRedirectTarget(t, false) // before the leak check: it outlives the host
				leaks := leakCheck(t)
				clk := newClockAtNow()
				var mu sync.Mutex
				var at []time.Time // fake time of each redirected request
				f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
					if r.URL.Path != place.path || place.signed && !strings.Contains(r.Header.Get("Authorization"), "sig=") {
						return false
					}
					mu.Lock()
					at = append(at, clk.Now())
					mu.Unlock()
					http.Redirect(w, r, target.URL+r.URL.Path, status)
					return true
				})
				defer f.SetBrokerFault(nil)
				clk.SetHorizon(clk.Now().Add(24 * time.Hour))
				r := startRig(t, f, clk, nil, nil, WithAccessToken(token), WithStorage(storage.Memory()))
				clk.WaitParked(t, 30*time.Second)

				if got := targetLog.all(); len(got) != 0 {
					t.Fatalf("the redirect was followed: the other server received %d requests, the first:\n%s", len(got), got[0])
				}
				var be *BrokerError
				if ev := r.fails.last(t); !errors.As(ev.Err, &be) || be.StatusCode != status || be.Location != target.URL+place.path {
					t.Fatalf("failure %v, want a BrokerError with status %d naming the Location on %s", ev.Err, status, target.URL)
				}
				if r.m.cert.Load() != nil {
					t.Fatal("a certificate is served although every registration was redirected")
				}

				waits := r.retries()
				mu.Lock()
				redirected := append([]time.Time(nil), at...)
				mu.Unlock()
				t.Logf("a day of redirects: %d attempts, waits %v", len(waits), waits)
				if len(waits) == 0 || len(redirected) != len(waits) {
					t.Fatalf("%d redirected requests for %d failed attempts, want one each", len(redirected), len(waits))
				}
				for i, w := range waits {
					if w < retryCap*9/10 {
						t.Errorf("retry %d after %v; a redirect needs a change first (want ≥ %v)", i+1, w, retryCap*9/10)
					}
				}
				for i := 1; i < len(redirected); i++ {
					if gap := redirected[i].Sub(redirected[i-1]); gap < retryCap*9/10 {
						t.Errorf("redirected request %d came %v after the one before, want ≥ %v", i+1, gap, retryCap*9/10)
					}
				}

				w := warnings(r)
				if len(w) != 1 {
					t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
				}
				t.Logf("the operator reads: %s", w[0].text)
				if !strings.Contains(w[0].text, "WithRegistrationEndpoint") {
					t.Error("the warning does not say to set WithRegistrationEndpoint")
				}
				if strings.Contains(r.logs.String(), token) {
					t.Error("the access token was logged")
				}
				pingOverTCP(t, f, r.h)
				r.closeAndCheck(t, leaks)
			})
		}
	}
}
