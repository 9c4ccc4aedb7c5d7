package autotls

// Fault tests of the broker: transient failures, Retry-After, garbage,
// and a day of outage (refusals that need a change first, such as a failed
// dial-back, are in faults_broker_refusal_test.go). Each drives the real
// components (Pebble, the test broker with its libp2p dial-back, the
// forge's DNS, real libp2p hosts) into one fault and checks what an
// operator running this unattended relies on: one clear log line, a
// bounded backoff that honours Retry-After, recovery by itself, the host's
// other transports untouched, the certificate in use kept, and no
// goroutine left behind. Time is the fake clock of clock_test.go: the
// manager's backoff runs at production values and is asserted from the
// waits it asks for, never from a stopwatch. docs/reliability.md maps each
// fault to its tests.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestFaultBrokerTransient: a broker answering 5xx, refusing connections
// or hanging is a transient failure: the manager backs off exponentially
// with full jitter from retryBase towards retryCap, says so once at warning
// level, and obtains the certificate by itself once the broker is back.
// It covers both gates: the health check before the first issuance, and
// the registration inside an ACME order.
func TestFaultBrokerTransient(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name string
		// path is the broker path the fault applies to ("" for a fault
		// of the whole broker).
		path string
		// fault answers a request while the broker is faulty.
		fault func(w http.ResponseWriter, r *http.Request)
		// refuse takes the broker's listener down instead.
		refuse bool
		// httpTimeout, if set, bounds each broker request (for the hang).
		httpTimeout time.Duration
		horizon     time.Duration
	}{
		{name: "503 on health", path: healthPath, horizon: 30 * time.Minute, fault: func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "upstream connect error or disconnect/reset before headers", http.StatusServiceUnavailable)
		}},
		{name: "500 on register", path: registerPath, horizon: 30 * time.Minute, fault: func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "error storing value: dynamodb: throttled", http.StatusInternalServerError)
		}},
		{name: "connection refused", refuse: true, horizon: 30 * time.Minute},
		{name: "hang on health", path: healthPath, httpTimeout: time.Second, horizon: time.Minute, fault: func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done()
		}},
		{name: "hang on register", path: registerPath, httpTimeout: time.Second, horizon: time.Minute, fault: func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			var down atomic.Bool
			var faulted atomic.Int32
			down.Store(true)
			if tc.fault != nil {
				f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
					if !down.Load() || (tc.path != "" && r.URL.Path != tc.path) {
						return false
					}
					faulted.Add(1)
					tc.fault(w, r)
					return true
				})
				defer f.SetBrokerFault(nil)
			}
			if tc.refuse {
				if err := f.BrokerDown(); err != nil {
					t.Fatal(err)
				}
			}
			var opts []Opt
			tr := http.DefaultTransport.(*http.Transport).Clone()
			if tc.httpTimeout > 0 {
				opts = append(opts, WithHTTPClient(&http.Client{Transport: tr, Timeout: tc.httpTimeout}))
			}
			clk := newClockAtNow()
			start := clk.Now()
			clk.SetHorizon(start.Add(tc.horizon))
			r := startRig(t, f, clk, nil, nil, append(opts, WithStorage(storage.Memory()))...)
			r.closers = append(r.closers, tr.CloseIdleConnections)

			clk.WaitParked(t, 30*time.Second)
			waits := r.retries()
			if len(waits) < 2 {
				t.Fatalf("%d attempts in %v of outage, want several; log:\n%s", len(waits), tc.horizon, r.logs)
			}
			checkBackoff(t, waits)
			if tc.fault != nil && int(faulted.Load()) != len(waits) {
				t.Errorf("%d faulted broker requests for %d failed attempts: each attempt should cost one", faulted.Load(), len(waits))
			}
			if r.m.cert.Load() != nil {
				t.Fatal("a certificate is served although the broker is down")
			}
			w := warnings(r)
			if len(w) != 1 {
				t.Fatalf("%d warnings for one outage, want 1:\n%s", len(w), r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			if !strings.Contains(w[0].text, "broker") {
				t.Errorf("the warning does not name the broker: %s", w[0].text)
			}
			pingOverTCP(t, f, r.h)

			// The broker returns: the parked retry fires and succeeds.
			down.Store(false)
			if tc.refuse {
				if err := f.BrokerUp(); err != nil {
					t.Fatal(err)
				}
			}
			clk.SetHorizon(clk.Now().Add(retryCap))
			c := r.waitLoaded(t)
			if servedSerial(t, r) != c.leaf.SerialNumber.String() {
				t.Error("the WSS listener does not serve the certificate obtained after the outage")
			}
			pingOverTCP(t, f, r.h)
			r.closeAndCheck(t, leaks)
		})
	}
}

// TestFaultBrokerBlip: a broker that fails twice in a row (503, no
// Retry-After) and then answers costs seconds: the certificate comes after
// two retries whose waits, as the manager logged them, add up to 30 s at
// most, and the third request to the faulty path comes that long after
// the first on the fake clock. The 503 comes on the health check, on the
// registration's first request, or only on the request that completes
// the PeerID handshake (as a proxy in front of the broker would send it).
func TestFaultBrokerBlip(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		name string
		path string
		// signed: only the request carrying the node's handshake
		// signature fails.
		signed bool
	}{
		{"health", healthPath, false},
		{"registration", registerPath, false},
		{"registration, completing the handshake", registerPath, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(time.Minute)) // before the first ARI poll can be due
			var mu sync.Mutex
			var at []time.Time // fake time of each request on the path
			f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
				if r.URL.Path != tc.path || tc.signed && !strings.Contains(r.Header.Get("Authorization"), "sig=") {
					return false
				}
				mu.Lock()
				defer mu.Unlock()
				at = append(at, clk.Now())
				if len(at) > 2 {
					return false
				}
				http.Error(w, "upstream connect error or disconnect/reset before headers", http.StatusServiceUnavailable)
				return true
			})
			defer f.SetBrokerFault(nil)
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()))
			clk.WaitParked(t, 30*time.Second)
			if r.m.cert.Load() == nil {
				t.Fatalf("no certificate a minute after two 503s; log:\n%s", r.logs)
			}

			waits := r.retries()
			if len(waits) != 2 {
				t.Fatalf("%d retries, want 2; log:\n%s", len(waits), r.logs)
			}
			checkBackoff(t, waits)
			if sum := waits[0] + waits[1]; sum > 30*time.Second {
				t.Errorf("retried after %v and %v: %v for a blip, want ≤ 30 s", waits[0], waits[1], sum)
			}
			mu.Lock()
			got := slices.Clone(at)
			mu.Unlock()
			if len(got) < 3 {
				t.Fatalf("%d requests to the faulty path, want 2 refused, then served", len(got))
			}
			if d := got[2].Sub(got[0]); d > 30*time.Second {
				t.Errorf("the broker was asked again %v after the first 503, want ≤ 30 s", d)
			}
			if w := warnings(r); len(w) != 1 {
				t.Errorf("%d warnings, want 1:\n%s", len(w), r.logs)
			}
			r.closeAndCheck(t, leaks)
		})
	}
}

// TestIssuanceFailedNotStateful: EvtIssuanceFailed is a happening, not
// state. After a failure (a 503 on the health check) and a later success,
// a new subscriber to it receives no failure, while a new subscriber to
// EvtCertificateLoaded receives the certificate in use with none being
// loaded. The bus replays a stateful event from a goroutine, not within
// Subscribe, but always before anything emitted after the subscription:
// so the absence is proved by a marker the test emits, which must be the
// first event the subscriber gets.
func TestIssuanceFailedNotStateful(t *testing.T) {
	f := startForge(t, testforge.Config{})
	leaks := leakCheck(t)
	var failed atomic.Bool
	f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != healthPath || failed.Swap(true) {
			return false
		}
		http.Error(w, "maintenance", http.StatusServiceUnavailable)
		return true
	})
	defer f.SetBrokerFault(nil)
	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute)) // before the first ARI poll can be due
	r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()))
	served := r.waitLoaded(t)
	clk.WaitParked(t, 30*time.Second) // idle from now on: nothing more is emitted
	if n := len(r.fails.all()); n != 1 {
		t.Fatalf("%d failures before the certificate, want 1", n)
	}

	bus := r.h.EventBus()
	failures, err := bus.Subscribe(new(EvtIssuanceFailed))
	if err != nil {
		t.Fatal(err)
	}
	defer failures.Close()
	em, err := bus.Emitter(new(EvtIssuanceFailed))
	if err != nil {
		t.Fatal(err)
	}
	defer em.Close()
	const marker = "marker emitted by the test after subscribing"
	if err := em.Emit(EvtIssuanceFailed{Err: errors.New(marker)}); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-failures.Out():
		if ev := e.(EvtIssuanceFailed); ev.Err == nil || ev.Err.Error() != marker {
			t.Errorf("a new subscriber received the failure of attempt %d (%v), mended since", ev.Attempt, ev.Err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the marker was not delivered within 30 s")
	}

	loaded, err := bus.Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer loaded.Close()
	select {
	case e := <-loaded.Out():
		if ev := e.(EvtCertificateLoaded); ev.Source != Obtained || !ev.NotAfter.Equal(served.leaf.NotAfter) {
			t.Errorf("a new subscriber received %+v, want the certificate in use (obtained, not after %v)", ev, served.leaf.NotAfter)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a new subscriber did not receive the certificate in use")
	}
	r.closeAndCheck(t, leaks)
}

// TestFaultBrokerRetryAfter: a 429 or 503 with Retry-After, as
// delay-seconds or as an HTTP-date, on the health check or on the
// registration, holds the next request back exactly that long, at most
// 10 % more (on the fake clock, the time between the two requests is
// exactly what the manager waited): 2 h, longer than the backoff would
// wait, and 5 s, shorter than it might.
func TestFaultBrokerRetryAfter(t *testing.T) {
	f := startForge(t, testforge.Config{})
	for _, tc := range []struct {
		after time.Duration
		form  string
	}{
		{2 * time.Hour, "seconds"},
		{2 * time.Hour, "date"},
		{5 * time.Second, "seconds"},
	} {
		for _, status := range []int{http.StatusTooManyRequests, http.StatusServiceUnavailable} {
			for _, path := range []string{healthPath, registerPath} {
				t.Run(fmt.Sprintf("%d %v as %s on %s", status, tc.after, tc.form, path), func(t *testing.T) {
					leaks := leakCheck(t)
					clk := newClockAtNow()
					clk.SetHorizon(clk.Now().Add(24 * time.Hour))
					type hit struct {
						at       time.Time // fake time of the request
						notUntil time.Time // the instant its Retry-After named, if faulted
					}
					var mu sync.Mutex
					var hits []hit
					f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
						if r.URL.Path != path {
							return false
						}
						mu.Lock()
						defer mu.Unlock()
						h := hit{at: clk.Now()}
						faulty := len(hits) < 2
						if faulty {
							h.notUntil = h.at.Add(tc.after)
							v := fmt.Sprint(int(tc.after / time.Second))
							if tc.form == "date" {
								// An HTTP-date names whole seconds: the
								// next one, so as not to ask for less.
								if frac := h.notUntil.Sub(h.notUntil.Truncate(time.Second)); frac > 0 {
									h.notUntil = h.notUntil.Add(time.Second - frac)
								}
								v = h.notUntil.UTC().Format(http.TimeFormat)
							}
							w.Header().Set("Retry-After", v)
							http.Error(w, "slow down", status)
						}
						hits = append(hits, h)
						return faulty
					})
					defer f.SetBrokerFault(nil)

					r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()))
					r.waitLoaded(t)
					mu.Lock()
					got := append([]hit(nil), hits...)
					mu.Unlock()
					if len(got) < 3 {
						t.Fatalf("%d requests to %s, want 2 refused and 1 served", len(got), path)
					}
					for i := 0; i < 2; i++ {
						named := got[i].notUntil.Sub(got[i].at)
						if gap := got[i+1].at.Sub(got[i].at); gap < named || gap > named+named/10 {
							t.Errorf("request %d came %v after a Retry-After of %v: want within [%v, %v]", i+2, gap, named, named, named+named/10)
						}
					}
					// The wait the manager logged is the same (the first
					// request comes at a whole second, so the date names
					// the delay exactly).
					if w := r.retries(); len(w) < 2 || w[0] < tc.after || w[0] > tc.after+tc.after/10 {
						t.Errorf("waits %v, want the first within [%v, %v]", w, tc.after, tc.after+tc.after/10)
					}
					pingOverTCP(t, f, r.h)
					r.closeAndCheck(t, leaks)
				})
			}
		}
	}
}

// TestFaultBrokerGarbage: what a broker (or a proxy in front of it) may
// send besides a proper answer: binary garbage with terminal escapes, a
// body without end, a body cut short, a 200 page where 204 was due, a
// mangled PeerID-auth challenge. Each gives a BrokerError whose body
// excerpt is short, valid UTF-8 and free of control characters, one log
// line that stays one line, no panic, a bounded read (the endless body is
// abandoned after a bounded amount), and recovery once the broker is sane.
func TestFaultBrokerGarbage(t *testing.T) {
	f := startForge(t, testforge.Config{})
	garbage := append([]byte("\x1b[2J\x1b[31mFAKE LOG LINE\nlevel=ERROR msg=pwned\r\n\x00\xff\xfe"), bytes.Repeat([]byte{0xc3, 0x28, 0x07}, 400)...)
	var streamed atomic.Int64
	// truncate promises 1000 bytes of body and hangs up after 17.
	truncate := func(w http.ResponseWriter, r *http.Request) {
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		_, _ = buf.WriteString("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000\r\n\r\nerror storing val")
		_ = buf.Flush()
		_ = conn.Close()
	}
	for _, tc := range []struct {
		name  string
		path  string
		fault func(w http.ResponseWriter, r *http.Request)
		check func(t *testing.T, be *BrokerError)
	}{
		{name: "binary garbage", path: registerPath, fault: func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusBadGateway)
			_, _ = w.Write(garbage)
		}},
		{name: "endless body", path: healthPath, fault: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(http.StatusServiceUnavailable)
			chunk := bytes.Repeat([]byte("<p>maintenance</p>"), 4096)
			for r.Context().Err() == nil {
				n, err := w.Write(chunk)
				streamed.Add(int64(n))
				if err != nil {
					return
				}
			}
		}, check: func(t *testing.T, be *BrokerError) {
			if be.StatusCode != http.StatusServiceUnavailable {
				t.Errorf("status %d, want 503", be.StatusCode)
			}
		}},
		{name: "endless body on register", path: registerPath, fault: func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusBadGateway)
			chunk := bytes.Repeat([]byte("<p>bad gateway</p>"), 4096)
			for r.Context().Err() == nil {
				n, err := w.Write(chunk)
				streamed.Add(int64(n))
				if err != nil {
					return
				}
			}
		}},
		{name: "truncated body on health", path: healthPath, fault: truncate, check: func(t *testing.T, be *BrokerError) {
			if be.StatusCode != http.StatusInternalServerError || !errors.Is(be.Err, io.ErrUnexpectedEOF) {
				t.Errorf("got status %d, err %v; want 500 with an unexpected EOF", be.StatusCode, be.Err)
			}
		}},
		// On the registration, the PeerID-auth layer reads the response
		// first: the failure is its (no handshake), with the status and
		// what arrived of the body.
		{name: "truncated body on register", path: registerPath, fault: truncate, check: func(t *testing.T, be *BrokerError) {
			if be.StatusCode != http.StatusInternalServerError || be.Body != "error storing val" {
				t.Errorf("got status %d, body %q; want 500 with what arrived", be.StatusCode, be.Body)
			}
		}},
		{name: "200 page for health", path: healthPath, fault: func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.WriteString(w, "<html><body>Please log in to the hotel Wi-Fi</body></html>")
		}},
		{name: "mangled auth challenge", path: registerPath, fault: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("WWW-Authenticate", `libp2p-PeerID challenge-client="\x00", public-key="!!!notbase64", sig=, opaque`)
			w.WriteHeader(http.StatusUnauthorized)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leaks := leakCheck(t)
			var sane atomic.Bool
			var faulted atomic.Int64
			f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
				if sane.Load() || r.URL.Path != tc.path {
					return false
				}
				faulted.Add(1)
				tc.fault(w, r)
				return true
			})
			defer f.SetBrokerFault(nil)
			streamed.Store(0)
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(30 * time.Second))
			r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()))
			clk.WaitParked(t, 30*time.Second)

			ev := r.fails.last(t)
			var be *BrokerError
			if !errors.As(ev.Err, &be) {
				t.Fatalf("failure %v is not a BrokerError", ev.Err)
			}
			if len(be.Body) > maxErrorBody || !utf8.ValidString(be.Body) || strings.ContainsFunc(be.Body, unicode.IsControl) {
				t.Errorf("body excerpt of %d bytes, valid UTF-8 %v, or with control characters: %q", len(be.Body), utf8.ValidString(be.Body), be.Body)
			}
			if tc.check != nil {
				tc.check(t, be)
			}
			// Per request: what the client reads is bounded (64 KiB); the
			// rest is what the loopback socket buffers took before the
			// client hung up.
			if n, reqs := streamed.Load(), max(faulted.Load(), 1); n/reqs > 16<<20 {
				t.Errorf("%d bytes of an endless body sent per request, want a bounded read", n/reqs)
			} else if n > 0 {
				t.Logf("the endless body was abandoned after the broker had sent %d bytes per request (%d requests)", n/reqs, reqs)
			}
			w := warnings(r)
			if len(w) != 1 {
				t.Fatalf("%d warnings, want 1:\n%s", len(w), r.logs)
			}
			t.Logf("the operator reads: %s", w[0].text)
			if strings.Count(w[0].text, "\n") != 1 || strings.Contains(w[0].text, "\x1b") {
				t.Errorf("the warning is not one clean line: %q", w[0].text)
			}
			pingOverTCP(t, f, r.h)

			sane.Store(true)
			clk.SetHorizon(clk.Now().Add(retryCap))
			r.waitLoaded(t)
			r.closeAndCheck(t, leaks)
		})
	}
}

// TestFaultBrokerOutageDay: a broker that stays down for a whole day
// (simulated: the fake clock runs the production backoff, 6 s doubling to
// six hours) costs at most 20 broker requests, and the log says it once.
// Before the first certificate the broker answers 503 and the health gate
// keeps the CA out of it; at renewal the broker refuses connections: the
// first attempt is one ACME order that stops at the registration, the
// next ones a health check each. The counts are logged (go test -run
// TestFaultBrokerOutageDay -v).
func TestFaultBrokerOutageDay(t *testing.T) {
	const day = 24 * time.Hour
	t.Run("before the first certificate", func(t *testing.T) {
		f := startForge(t, testforge.Config{})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		f.SetBrokerFault(func(w http.ResponseWriter, r *http.Request) bool {
			http.Error(w, "service unavailable", http.StatusServiceUnavailable)
			return true
		})
		defer f.SetBrokerFault(nil)
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(day))
		r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots))
		r.closers = append(r.closers, ca.Close)
		clk.WaitParked(t, 30*time.Second)
		st := f.Stats()
		broker, caReqs := st.Health+st.Challenge, len(ca.Requests())
		t.Logf("a day of broker outage before the first certificate: %d broker requests (%d health, %d registration), %d CA requests, %d warning(s)",
			broker, st.Health, st.Challenge, caReqs, len(warnings(r)))
		checkBackoff(t, r.retries())
		if broker > 20 || caReqs != 0 {
			t.Errorf("%d broker and %d CA requests in a day", broker, caReqs)
		}
		if w := warnings(r); len(w) != 1 {
			t.Errorf("%d warnings in a day, want 1:\n%s", len(w), r.logs)
		}
		pingOverTCP(t, f, r.h)
		r.closeAndCheck(t, leaks)
	})

	t.Run("at renewal", func(t *testing.T) {
		f := startForge(t, testforge.Config{})
		ca := startCAProxy(t, f)
		leaks := leakCheck(t)
		tr := http.DefaultTransport.(*http.Transport).Clone()
		counter := &countingTransport{next: tr}
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(time.Minute))
		r := startRig(t, f, clk, nil, nil, WithStorage(storage.Memory()), WithCA(ca.URL, ca.Roots),
			WithHTTPClient(&http.Client{Transport: counter, Timeout: time.Minute}))
		r.closers = append(r.closers, ca.Close, tr.CloseIdleConnections)
		served := r.waitLoaded(t)
		clk.WaitParked(t, 30*time.Second)
		forgetValidAuthz(t, r, ca)

		// From now on the CA's renewal information (ARI) says: renew now
		// (its window is in the past on the simulated clock, as before a
		// revocation), and poll again in 6 h. A delay in seconds, as a CA
		// sends it: acmez turns it into a wall-clock instant, which the
		// manager measures on the wall clock, so the simulated clock still
		// waits 6 h.
		ca.SetFault(func(w http.ResponseWriter, req *http.Request) bool {
			if !strings.Contains(req.URL.Path, "renewalInfo") {
				return false
			}
			now := clk.Now()
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Retry-After", fmt.Sprint(int((6 * time.Hour).Seconds())))
			fmt.Fprintf(w, `{"suggestedWindow":{"start":%q,"end":%q}}`,
				now.Add(-2*time.Hour).UTC().Format(time.RFC3339), now.Add(-time.Hour).UTC().Format(time.RFC3339))
			return true
		})
		if err := f.BrokerDown(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := f.BrokerUp(); err != nil {
				t.Error(err)
			}
		}()
		brokerBefore, caBefore, warnBefore := counter.n.Load(), len(ca.Requests()), len(warnings(r))
		start := clk.Now()
		clk.SetHorizon(start.Add(day))
		clk.WaitParked(t, 30*time.Second)
		broker := counter.n.Load() - brokerBefore
		caReqs := ca.Requests()[caBefore:]
		warned := warnings(r)[warnBefore:]
		t.Logf("a day of broker outage at renewal: %d broker requests (connections refused), %d CA requests (%d new orders, %d renewal-info), %d warning(s)",
			broker, len(caReqs), count(caReqs, http.MethodPost, "/order-plz"), count(caReqs, http.MethodGet, "/draft-ietf-acme-ari"), len(warned))
		if broker < 5 {
			t.Errorf("%d renewal attempts in a day: the renewal was not due:\n%s", broker, r.logs)
		}
		if broker > 20 || len(caReqs) > 20*4 {
			t.Errorf("%d broker and %d CA requests in a day", broker, len(caReqs))
		}
		if len(warned) != 1 {
			t.Errorf("%d warnings in a day, want 1:\n%s", len(warned), r.logs)
		}
		if r.m.cert.Load() != served || servedSerial(t, r) != served.leaf.SerialNumber.String() {
			t.Errorf("the certificate in use was lost during the outage:\n%s", r.logs)
		}
		pingOverTCP(t, f, r.h)
		r.closeAndCheck(t, leaks)
	})
}
