package autotls

// Tests of the issuance budget (budget.go): the count, what the run loop
// does with a refusal, and the count shared across restarts and across
// processes.

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// TestBudgetCount: what is counted, when the budget frees up, and what a
// renewal of a valid certificate may do.
func TestBudgetCount(t *testing.T) {
	t0 := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	day := 24 * time.Hour
	valid := &servedCert{leaf: &x509.Certificate{NotAfter: t0.Add(30 * day)}}
	expired := &servedCert{leaf: &x509.Certificate{NotAfter: t0.Add(-time.Second)}}
	for _, tc := range []struct {
		name   string
		issued []time.Duration // recorded, relative to t0
		cur    *servedCert
		now    time.Duration // relative to t0
		frees  time.Duration // relative to t0; 0: allowed
	}{
		{"four this week", []time.Duration{0, day, 2 * day, 3 * day}, nil, 4 * day, 0},
		{"five this week", []time.Duration{0, day, 2 * day, 3 * day, 4 * day}, nil, 5 * day, budgetWindow},
		{"five, recorded out of order", []time.Duration{3 * day, 0, 4 * day, day, 2 * day}, nil, 5 * day, budgetWindow},
		{"six (a renewal of a valid one)", []time.Duration{0, day, 2 * day, 3 * day, 4 * day, 5 * day}, nil, 5 * day, day + budgetWindow},
		{"five, the oldest a week old to the second", []time.Duration{0, day, 2 * day, 3 * day, 4 * day}, nil, budgetWindow, 0},
		{"five, the oldest a second short of a week", []time.Duration{0, day, 2 * day, 3 * day, 4 * day}, nil, budgetWindow - time.Second, budgetWindow},
		{"five, renewing a valid one", []time.Duration{0, day, 2 * day, 3 * day, 4 * day}, valid, 5 * day, 0},
		{"five, replacing an expired one", []time.Duration{0, day, 2 * day, 3 * day, 4 * day}, expired, 5 * day, budgetWindow},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := budgetManager(t, storage.Memory(), nil)
			seed(t, m, tc.issued, t0)
			err := m.checkBudget(t.Context(), tc.cur, t0.Add(tc.now))
			var be *budgetError
			switch {
			case tc.frees == 0 && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.frees == 0:
			case !errors.As(err, &be):
				t.Fatalf("checkBudget = %v, want a *budgetError", err)
			case !be.frees.Equal(t0.Add(tc.frees)) || be.name != m.name || be.count != len(tc.issued):
				t.Fatalf("refusal %+v, want %d for %s freeing at %v", be, len(tc.issued), m.name, t0.Add(tc.frees))
			}
		})
	}
}

// budgetManager is a manager with just what the budget needs.
func budgetManager(t *testing.T, st certmagic.Storage, log *slog.Logger) *manager {
	t.Helper()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	name := "*.k51qzi5uqu5dbudget.libp2p.direct"
	return &manager{name: name, log: log, store: &pairStore{s: st, issuerKey: "ca-dir", name: name, log: log}}
}

// seed records certificates issued at t0 plus each of at, with serials
// counting from 1.
func seed(t *testing.T, m *manager, at []time.Duration, t0 time.Time) {
	t.Helper()
	for n, d := range at {
		m.recordIssuance(t.Context(), &x509.Certificate{SerialNumber: big.NewInt(int64(n + 1))}, t0.Add(d))
	}
}

// TestBudgetRecord: the record drops what has left the window when it is
// written, keeps time and serial, and a record that cannot be decoded
// neither blocks issuance nor stays.
func TestBudgetRecord(t *testing.T) {
	t0 := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	st := storage.Memory()
	logs := &logCapture{}
	m := budgetManager(t, st, logs.logger())
	seed(t, m, []time.Duration{0, time.Hour, 3 * 24 * time.Hour}, t0)
	m.recordIssuance(t.Context(), &x509.Certificate{SerialNumber: big.NewInt(0xabc)}, t0.Add(budgetWindow+2*time.Hour))
	raw, err := st.Load(t.Context(), m.store.budgetKey())
	if err != nil {
		t.Fatal(err)
	}
	want := `[{"at":"2025-03-04T12:00:00Z","serial":"3"},{"at":"2025-03-08T14:00:00Z","serial":"abc"}]`
	if string(raw) != want {
		t.Errorf("record %s, want %s", raw, want)
	}
	if !strings.HasPrefix(m.store.budgetKey(), "autotls/issuance/ca-dir/") {
		t.Errorf("record at %s", m.store.budgetKey())
	}

	if err := st.Store(t.Context(), m.store.budgetKey(), []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	if err := m.checkBudget(t.Context(), nil, t0); err != nil {
		t.Errorf("an undecodable record refused issuance: %v", err)
	}
	seed(t, m, []time.Duration{0}, t0)
	if raw, _ := st.Load(t.Context(), m.store.budgetKey()); !strings.HasPrefix(string(raw), `[{"at"`) {
		t.Errorf("the undecodable record was not replaced: %s", raw)
	}
	if w := logs.atLeast(slog.LevelWarn); len(w) != 2 || !strings.Contains(w[0].msg, "issuance budget is unreadable") {
		t.Errorf("warnings %v, want one per reading of the undecodable record", w)
	}
}

// TestBudgetFailure: a refusal is its own kind of failure, said once
// whatever its count and time, naming the limit and when it frees up, and
// retried exactly then.
func TestBudgetFailure(t *testing.T) {
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	a := &budgetError{name: "*.k51.libp2p.direct", count: 5, frees: now.Add(budgetWindow - time.Minute)}
	b := &budgetError{name: "*.k51.libp2p.direct", count: 6, frees: now.Add(time.Hour)}
	fa := classify(fmt.Errorf("obtaining: %w", a), now)
	fb := classify(b, now)
	if fa.kind != kindBudget || fa.key != fb.key || fa.permanent || fa.floor != 0 {
		t.Errorf("failures %+v and %+v, want kind %s with one key", fa, fb, kindBudget)
	}
	for _, says := range []string{"5 per exact set of names per week", "2025-03-08T11:59:00Z"} {
		if !strings.Contains(fa.sentence, says) {
			t.Errorf("sentence %q does not say %q", fa.sentence, says)
		}
	}
	for attempt := 1; attempt <= 30; attempt++ {
		if d := retryDelay(fa, attempt, now); d != budgetWindow-time.Minute {
			t.Fatalf("attempt %d: retry in %v, want exactly %v", attempt, d, budgetWindow-time.Minute)
		}
	}
	if d := retryDelay(fa, 1, a.frees.Add(time.Second)); d != 0 {
		t.Errorf("retry in %v once the budget has freed up, want 0", d)
	}
}

// TestBudgetAcrossRestarts: five hosts of one identity in succession,
// sharing one storage, each started with the certificate deleted so that
// it must issue, get five certificates. The sixth sends no order to the
// CA, says so once (naming the limit and the time it frees up) and waits
// exactly until then; with its clock moved there, it issues.
func TestBudgetAcrossRestarts(t *testing.T) {
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	key := genKey(t, crypto.Ed25519)
	st := storage.Memory()
	start := func() *faultRig {
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(time.Minute))
		return startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st), WithCA(ca.URL, ca.Roots))
	}
	for n := range budgetLimit {
		r := start()
		if ev := waitCert(t, r.h, 30*time.Second); ev.Source != Obtained {
			t.Fatalf("host %d: certificate %s, want %s", n+1, ev.Source, Obtained)
		}
		if err := r.m.store.delete(t.Context(), ""); err != nil {
			t.Fatal(err)
		}
		r.close(t)
	}
	if n := count(ca.Requests(), http.MethodPost, "/finalize-order/"); n != budgetLimit {
		t.Fatalf("%d finalizations for %d hosts", n, budgetLimit)
	}

	before, stats := len(ca.Requests()), f.Stats()
	r := start()
	r.closers = append(r.closers, ca.Close)
	ev := r.fails.last(t)
	var be *budgetError
	if !errors.As(ev.Err, &be) || be.count != budgetLimit {
		t.Fatalf("the sixth host failed with %v, want a budget refusal", ev.Err)
	}
	recorded, err := r.m.store.issuances(t.Context(), r.clk.Now())
	if err != nil || len(recorded) != budgetLimit {
		t.Fatalf("%d issuances recorded (%v), want %d", len(recorded), err, budgetLimit)
	}
	frees := recorded[0].At.Add(budgetWindow)
	if !be.frees.Equal(frees) || !ev.NextRetry.Equal(frees) {
		t.Errorf("frees at %v, next retry %v; want both at %v (the oldest issuance + 7 days)", be.frees, ev.NextRetry, frees)
	}
	r.clk.WaitParked(t, 30*time.Second)
	if n := count(ca.Requests()[before:], http.MethodPost, "/order-plz"); n != 0 {
		t.Errorf("the sixth host sent %d orders", n)
	}
	if n := f.Stats().Registered - stats.Registered; n != 0 {
		t.Errorf("the sixth host registered %d challenges with the broker", n)
	}
	w := warnings(r)
	if len(w) != 1 || !strings.Contains(w[0].msg, "5 per exact set of names per week") || !strings.Contains(w[0].msg, frees.UTC().Format(time.RFC3339)) {
		t.Fatalf("warnings %d, want one naming the limit and %v:\n%s", len(w), frees, r.logs)
	}
	t.Logf("the operator reads: %s", w[0].text)
	if waits := r.retries(); len(waits) != 1 || waits[0] != frees.Sub(r.clk.Now()) {
		t.Errorf("waits %v, want one of exactly %v", waits, frees.Sub(r.clk.Now()))
	}

	// Room for the order's polls, which run on the fake clock while
	// Pebble validates in real time.
	r.clk.SetHorizon(frees.Add(5 * time.Minute))
	c := r.waitLoaded(t)
	if n := count(ca.Requests()[before:], http.MethodPost, "/finalize-order/"); n != 1 {
		t.Errorf("%d finalizations once the budget freed up, want 1", n)
	}
	// The record keeps what is still within the window, and the sixth.
	var want []string
	for _, i := range recorded {
		if i.At.Add(budgetWindow).After(r.clk.Now()) {
			want = append(want, i.Serial)
		}
	}
	want = append(want, c.leaf.SerialNumber.Text(16))
	raw, err := st.Load(t.Context(), r.m.store.budgetKey())
	var after []issuance
	if err == nil {
		err = json.Unmarshal(raw, &after)
	}
	var got []string
	for _, i := range after {
		got = append(got, i.Serial)
	}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("record after the sixth: %v (%v), want %v", got, err, want)
	}
	if w := warnings(r); len(w) != 1 {
		t.Errorf("%d warnings, want the one:\n%s", len(w), r.logs)
	}
	r.closeAndCheck(t, leaks)
}

// TestBudgetRenewalExempt: with five certificates recorded for the name,
// a renewal of the valid certificate in use, which names it in "replaces"
// (exempt from the limit at Let's Encrypt), is not held back, and counts.
func TestBudgetRenewalExempt(t *testing.T) {
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	r := startProxiedRig(t, f, ca)
	served := r.waitLoaded(t)
	seed(t, r.m, []time.Duration{time.Second, 2 * time.Second, 3 * time.Second, 4 * time.Second}, r.clk.Now().Add(-time.Hour))
	if err := r.m.checkBudget(t.Context(), nil, r.clk.Now()); err == nil {
		t.Fatal("five certificates recorded, but a new one would not be held back")
	}

	before := len(ca.Requests())
	r.kick(t)
	renewed := r.waitRenewed(t, served)
	var orders []string
	for _, q := range ca.Requests()[before:] {
		if q.Method == http.MethodPost && q.Path == "/order-plz" {
			orders = append(orders, orderReplaces(t, q.Body))
		}
	}
	if len(orders) == 0 || orders[0] == "" {
		t.Errorf("renewal orders %q, want the first to name the replaced certificate", orders)
	}
	recorded, err := r.m.store.issuances(t.Context(), r.clk.Now())
	if err != nil || len(recorded) != budgetLimit+1 || recorded[budgetLimit].Serial != renewed.leaf.SerialNumber.Text(16) {
		t.Errorf("record %+v (%v), want six, the renewal last", recorded, err)
	}
	if w := warnings(r); len(w) != 0 {
		t.Errorf("%d warnings, want none:\n%s", len(w), r.logs)
	}
	r.closeAndCheck(t, leaks)
}

// TestBudgetAcrossProcesses: two processes with one identity, sharing one
// storage, each start host after host with the certificate deleted, until
// the budget refuses them. Together they get exactly five certificates
// from the CA, whoever issued each: the record is read and written under
// the storage's lock, so no count is lost between processes. A third
// process is refused without a request to the CA.
func TestBudgetAcrossProcesses(t *testing.T) {
	for _, kind := range []string{"dir", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			f := startForge(t, testforge.Config{})
			ca := startCAProxy(t, f)
			key := genKey(t, crypto.Ed25519)
			job := newChildJob(t, f, ca, "budget", key)
			var st certmagic.Storage
			if kind == "dir" {
				job.Dir = filepath.Join(t.TempDir(), "store")
				s, err := storage.Dir(job.Dir)
				if err != nil {
					t.Fatal(err)
				}
				st = s
			} else {
				job.PostgresURL, job.Schema = testPostgresURL(t), newPostgresSchema(t)
				st = openPostgres(t, job.Schema)
			}
			a, b := startChild(t, job), startChild(t, job)
			obtained := 0
			for _, c := range []*child{a, b} {
				reports := c.untilDone(t, time.Minute)
				mine := 0
				for _, r := range reports {
					if r.Event == "cert" && r.Source == Obtained {
						mine++
					}
				}
				if last := reports[len(reports)-1]; last.Event != "refused" {
					t.Errorf("a child ended with %+v, want a refusal", last)
				}
				t.Logf("a child: %d hosts, %d certificates obtained", len(reports), mine)
				obtained += mine
			}
			if n := count(ca.Requests(), http.MethodPost, "/finalize-order/"); obtained != budgetLimit || n != budgetLimit {
				t.Fatalf("the two processes obtained %d certificates, with %d finalizations; want %d", obtained, n, budgetLimit)
			}

			before := len(ca.Requests())
			clk := newClockAtNow()
			clk.SetHorizon(clk.Now().Add(time.Minute))
			r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st), WithCA(ca.URL, ca.Roots))
			var be *budgetError
			if ev := r.fails.last(t); !errors.As(ev.Err, &be) {
				t.Fatalf("the third process failed with %v, want a budget refusal", ev.Err)
			}
			if n := len(ca.Requests()[before:]); n != 0 {
				t.Errorf("the third process sent %d requests to the CA", n)
			}
			r.close(t)
		})
	}
}

// childBudget is the child of TestBudgetAcrossProcesses: it starts a host
// with the job's identity after another, each with the certificate
// deleted, and reports each certificate, until the budget refuses one.
func childBudget(t *testing.T, job childJob, st certmagic.Storage, w *childWriter) {
	key := job.key(t, 0)
	ps := &pairStore{s: st, issuerKey: issuerKey(job.CAURL), name: certName(idOf(t, key), job.Domain), log: slog.New(slog.DiscardHandler)}
	for range 20 {
		if err := ps.delete(t.Context(), ""); err != nil {
			t.Fatal(err)
		}
		fails := &failureLog{}
		h, err := job.newHost(key, st, fails.option(t))
		if err != nil {
			t.Fatal(err)
		}
		r, refused := budgetChildWait(t, h, fails)
		_ = h.Close()
		fails.stop()
		w.report(r)
		if refused {
			return
		}
	}
	t.Fatal("20 hosts, and none refused")
}

// budgetChildWait waits until h serves a certificate or is refused by the
// budget.
func budgetChildWait(t *testing.T, h host.Host, fails *failureLog) (childReport, bool) {
	t.Helper()
	sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	timeout := time.After(30 * time.Second)
	for seen := 0; ; {
		fails.mu.Lock()
		evs, more := fails.evs[seen:], fails.more
		seen = len(fails.evs)
		fails.mu.Unlock()
		for _, ev := range evs {
			var be *budgetError
			if errors.As(ev.Err, &be) {
				return childReport{Event: "refused", Peer: h.ID().String()}, true
			}
		}
		select {
		case e := <-sub.Out():
			return childReport{Event: "cert", Peer: h.ID().String(), Source: e.(EvtCertificateLoaded).Source}, false
		case <-more:
		case <-timeout:
			t.Fatalf("no certificate and no refusal within 30 s")
		}
	}
}
