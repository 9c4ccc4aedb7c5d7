package autotlstest_test

// Each fault knob, as a downstream test uses it: a host under the fault
// reports the failure, and recovers once the fault is cleared (or, for a
// fault that names its end, by itself).

import (
	"errors"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/mholt/acmez/v3/acme"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/autotlstest"
	"github.com/p2ptls/autotls/storage"
)

func brokerError(t *testing.T, ev autotls.EvtIssuanceFailed) *autotls.BrokerError {
	t.Helper()
	var be *autotls.BrokerError
	if !errors.As(ev.Err, &be) {
		t.Fatalf("failure %v, want an *autotls.BrokerError", ev.Err)
	}
	return be
}

func TestFaultBrokerDown(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	f.BrokerDown()
	h := newHost(t, f, nil)
	if be := brokerError(t, f.WaitIssuanceFailed(t, h)); be.StatusCode != 0 {
		t.Fatalf("broker down: got status %d, want no answer", be.StatusCode)
	}
	f.BrokerUp()
	pingOverWSS(t, f, h, f.WaitBrowserAddr(t, h))
}

func TestFaultFailBroker(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	f.FailBroker(1000, http.StatusServiceUnavailable, time.Second)
	h := newHost(t, f, nil)
	ev := f.WaitIssuanceFailed(t, h)
	be := brokerError(t, ev)
	if be.StatusCode != http.StatusServiceUnavailable || be.RetryAfter != time.Second {
		t.Fatalf("got status %d, Retry-After %v; want 503 and 1s", be.StatusCode, be.RetryAfter)
	}
	f.FailBroker(0, 0, 0)
	f.WaitBrowserAddr(t, h)
}

// TestFaultFailBrokerCount: a fault for the next n requests ends by
// itself; the host retries at the Retry-After and succeeds.
func TestFaultFailBrokerCount(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	f.FailBroker(1, http.StatusTooManyRequests, time.Second)
	h := newHost(t, f, nil)
	if be := brokerError(t, f.WaitIssuanceFailed(t, h)); be.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("got status %d, want 429", be.StatusCode)
	}
	f.WaitBrowserAddr(t, h)
}

func TestFaultDelayTXT(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	f.DelayTXT(time.Hour)
	h := newHost(t, f, nil)
	// The host looks up its TXT record and does not see it in time: it
	// must not ask the CA to validate, so nothing is announced.
	deadline := time.Now().Add(30 * time.Second)
	for f.Stats().TXT < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("the host made no second TXT lookup; stats %+v", f.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if s := f.Stats(); s.Registered != 1 {
		t.Fatalf("stats %+v, want one registration", s)
	}
	f.DelayTXT(0)
	f.WaitBrowserAddr(t, h)
}

func TestFaultRateLimitCA(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	const limit = 2 * time.Second
	f.RateLimitCA(limit)
	end := time.Now().Add(limit)
	h := newHost(t, f, nil)
	ev := f.WaitIssuanceFailed(t, h)
	var prob acme.Problem
	if !errors.As(ev.Err, &prob) || prob.Type != acme.ProblemTypeRateLimited {
		t.Fatalf("failure %v, want the CA's rateLimited problem", ev.Err)
	}
	if ev.NextRetry.Before(end) {
		t.Errorf("next retry at %v, before the limit ends at %v", ev.NextRetry, end)
	}
	f.WaitBrowserAddr(t, h) // the limit ends by itself
}

func TestFaultRefuseDialBack(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	f.RefuseDialBack(true)
	key, store := genKey(t), storage.Memory()
	h := newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, autotls.WithStorage(store))
	ev := f.WaitIssuanceFailed(t, h)
	if be := brokerError(t, ev); !be.Unreachable() {
		t.Fatalf("failure %v, want the broker's 400 error testing addresses", ev.Err)
	}
	if wait := time.Until(ev.NextRetry); wait < 14*time.Minute {
		t.Errorf("next retry in %v: an unreachable host should not retry within minutes", wait)
	}
	// Recovery: the port is reachable again and the node restarts.
	f.RefuseDialBack(false)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	h = newHost(t, f, []libp2p.Option{libp2p.Identity(key)}, autotls.WithStorage(store))
	pingOverWSS(t, f, h, f.WaitBrowserAddr(t, h))
}

// TestShortLivedRenewal: with WithCertValidity, a renewal happens within
// the test and the host keeps serving.
func TestShortLivedRenewal(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t, autotlstest.WithCertValidity(4*time.Second))
	h := newHost(t, f, nil)
	sub, err := h.EventBus().Subscribe(new(autotls.EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	timeout := time.After(30 * time.Second)
	var first autotls.EvtCertificateLoaded
	for {
		select {
		case e := <-sub.Out():
			ev := e.(autotls.EvtCertificateLoaded)
			if first.Source == "" {
				first = ev
				if ev.NotAfter.Sub(ev.NotBefore) > 5*time.Second {
					t.Fatalf("certificate valid %v, want about 4s", ev.NotAfter.Sub(ev.NotBefore))
				}
				continue
			}
			if ev.Source != autotls.Renewed || !ev.NotAfter.After(first.NotAfter) {
				t.Fatalf("after %+v came %+v, want a renewal", first, ev)
			}
			t.Logf("obtained %v–%v, renewed at %v: %v–%v", first.NotBefore, first.NotAfter, time.Now(), ev.NotBefore, ev.NotAfter)
			pingOverWSS(t, f, h, f.WaitBrowserAddr(t, h))
			return
		case <-timeout:
			t.Fatal("no renewal within 30s")
		}
	}
}

// TestClearFaults: every knob at once, then ClearFaults.
func TestClearFaults(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t)
	f.BrokerDown()
	f.FailBroker(1000, http.StatusBadGateway, 0)
	f.DelayTXT(time.Hour)
	f.RateLimitCA(time.Hour)
	f.RefuseDialBack(true)
	f.ClearFaults()
	f.WaitBrowserAddr(t, newHost(t, f, nil))
}

// fatalTB records the message of Fatalf and ends the goroutine, as
// t.Fatalf does, without failing the test.
type fatalTB struct {
	testing.TB
	msg string
}

func (f *fatalTB) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// TestWaitBrowserAddrSaysWhy: when no address comes within the bound, the
// test fails with the host's autotls status and last issuance failure.
func TestWaitBrowserAddrSaysWhy(t *testing.T) {
	t.Parallel()
	f := autotlstest.New(t, autotlstest.WithWaitTimeout(time.Second))
	f.RefuseDialBack(true)
	h := newHost(t, f, nil)
	tb := &fatalTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.WaitBrowserAddr(tb, h)
	}()
	<-done
	for _, want := range []string{
		"no browser address within 1s",
		"autotls status: failed: no certificate; last failure (broker_unreachable)", // what the manager says
		"error testing addresses",                                                   // the broker's own words
	} {
		if !strings.Contains(tb.msg, want) {
			t.Errorf("WaitBrowserAddr failed with %q; want %q in it", tb.msg, want)
		}
	}
	t.Logf("the test reads: %s", tb.msg)
}
