package autotls

// Fleet tests: hosts in several processes sharing one PostgreSQL database
// (storage/postgres), as a fleet runs them: a rolling update, many
// identities, a process killed holding the issuance lock, and the database
// restarted under a serving and an issuing host. They need a PostgreSQL
// server: `bash .ci/postgres.sh go test -run Fleet .` starts one on
// loopback; without AUTOTLS_TEST_POSTGRES_URL they skip, except in CI.

import (
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/jackc/pgx/v5"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/p2ptls/autotls/internal/pgtest"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage/postgres"
)

// postgresURLEnv points the tests at a PostgreSQL database in which they
// may create and drop schemas (.ci/postgres.sh sets it).
const postgresURLEnv = pgtest.URLEnv

// testPostgresURL returns the database URL of the tests. Without one the
// test skips, except in CI (CI=true), where the database is part of the
// run.
func testPostgresURL(tb testing.TB) string {
	tb.Helper()
	if u := os.Getenv(postgresURLEnv); u != "" {
		return u
	}
	how := "run them with `bash .ci/postgres.sh go test .` (starts a throwaway PostgreSQL on loopback), or set " +
		postgresURLEnv + "=postgres://user@127.0.0.1:5432/db?sslmode=disable (a database where the user may create schemas)"
	if os.Getenv("CI") == "true" {
		tb.Fatalf("%s is not set in CI: .ci/run must start PostgreSQL; %s", postgresURLEnv, how)
	}
	tb.Skipf("%s is not set: PostgreSQL tests skipped; %s", postgresURLEnv, how)
	return ""
}

// newPostgresSchema returns the name of a schema of the test's own, which
// is dropped with everything in it at cleanup.
func newPostgresSchema(tb testing.TB) string {
	tb.Helper()
	dbURL := testPostgresURL(tb)
	pgtest.Hold(tb) // released after the schema is dropped
	name := "autotls_fleet_" + strings.ToLower(rand.Text()[:12])
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, dbURL)
		if err != nil {
			tb.Errorf("dropping schema %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+name+" CASCADE"); err != nil {
			tb.Errorf("dropping schema %s: %v", name, err)
		}
	})
	return name
}

// openPostgres opens a storage on the tables in schema, closed at cleanup
// (before the schema is dropped).
func openPostgres(tb testing.TB, schema string, opts ...postgres.Option) *postgres.Storage {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := postgres.New(ctx, testPostgresURL(tb), append([]postgres.Option{postgres.WithSchema(schema)}, opts...)...)
	if err != nil {
		tb.Fatalf("postgres.New: %v", err)
	}
	tb.Cleanup(st.Close)
	return st
}

// postgresJob is a child job storing in schema (see newChildJob).
func postgresJob(t *testing.T, f *testforge.Forge, ca *testforge.CAProxy, run, schema string, keys ...crypto.PrivKey) childJob {
	t.Helper()
	j := newChildJob(t, f, ca, run, keys...)
	j.PostgresURL, j.Schema = testPostgresURL(t), schema
	return j
}

// TestFleetRollingUpdate: two processes with the same identity and the
// same database start together, as in a rolling update where the new
// process starts before the old one is gone, with nothing stored yet: the
// storage's lock lets one issue, the other finds the certificate once it
// has the lock, so the CA issues one certificate, and both serve it.
func TestFleetRollingUpdate(t *testing.T) {
	schema := newPostgresSchema(t)
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	key := genKey(t, crypto.Ed25519)
	job := postgresJob(t, f, ca, "serve", schema, key)
	a, b := startChild(t, job), startChild(t, job)
	ra, rb := a.next(t, time.Minute), b.next(t, time.Minute)
	for _, r := range []childReport{ra, rb} {
		// The parent's own handshake, too.
		st, err := tlsHandshake(r.Addr, "127-0-0-1."+testforge.PeerLabel(idOf(t, key))+"."+f.Domain, f.IssuerRoots)
		if err != nil {
			t.Fatalf("TLS handshake with %s: %v", r.Addr, err)
		}
		if s := st.PeerCertificates[0].SerialNumber.Text(16); s != r.Serial {
			t.Errorf("%s served %s to the parent, %s to its own process", r.Addr, s, r.Serial)
		}
	}
	if ra.Serial != rb.Serial {
		t.Errorf("the two processes serve serials %s and %s, want one certificate", ra.Serial, rb.Serial)
	}
	if sources := []CertSource{ra.Source, rb.Source}; !slices.Contains(sources, Obtained) || !slices.Contains(sources, FromStorage) {
		t.Errorf("sources %v, want one obtained and one from storage", sources)
	}
	reqs := ca.Requests()
	if n, m := count(reqs, http.MethodPost, "/finalize-order/"), count(reqs, http.MethodPost, "/order-plz"); n != 1 || m != 1 {
		t.Errorf("%d orders and %d finalizations, want 1 each", m, n)
	}
	if n := f.Stats().Registered; n != 1 {
		t.Errorf("%d registrations with the broker, want 1", n)
	}
	a.untilDone(t, 30*time.Second)
	b.untilDone(t, 30*time.Second)
}

// childServe is the child of a test that looks at a serving host: it
// starts a host with the job's first identity, reports what it serves,
// and closes it when its standard input closes.
func childServe(t *testing.T, job childJob, st certmagic.Storage, w *childWriter) {
	h, err := job.newHost(job.key(t, 0), st)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	r, err := job.serving(h, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	w.report(r)
	_, _ = io.Copy(io.Discard, os.Stdin)
}

// TestFleetManyIdentities: 200 identities in 4 processes sharing one
// database each get a certificate. Then every process is restarted: every
// host serves its certificate from the database again, with no request to
// the broker, the CA or the forge's DNS. Each process runs its hosts 8 at
// a time and closes each once a TLS handshake has shown what it serves:
// the machine is busy either way (more at once is no faster on 2 cores,
// with the race detector), and the forge's DNS must answer the CA's
// lookups within its 2 s timeout.
func TestFleetManyIdentities(t *testing.T) {
	const procs, perProc = 4, 50
	schema := newPostgresSchema(t)
	f := startForge(t, testforge.Config{})
	jobs := make([]childJob, procs)
	for p := range jobs {
		keys := make([]crypto.PrivKey, perProc)
		for n := range keys {
			keys[n] = genKey(t, crypto.Ed25519)
		}
		// Straight to the CA: a proxy would cost a quarter of the time.
		jobs[p] = postgresJob(t, f, nil, "fleet", schema, keys...)
		jobs[p].Parallel = 8
	}
	run := func(phase string) map[string]childReport {
		t.Helper()
		start := time.Now()
		children := make([]*child, procs)
		for p, j := range jobs {
			children[p] = startChild(t, j)
		}
		got := map[string]childReport{}
		for _, c := range children {
			for _, r := range c.untilDone(t, 2*time.Minute) {
				if r.Event != "cert" {
					t.Fatalf("%s: a host reported %+v", phase, r)
				}
				got[r.Peer] = r
			}
		}
		if len(got) != procs*perProc {
			t.Fatalf("%s: %d hosts served a certificate, want %d", phase, len(got), procs*perProc)
		}
		t.Logf("%s: %d hosts in %d processes in %v", phase, len(got), procs, time.Since(start).Round(time.Millisecond))
		return got
	}

	first := run("first start")
	serials := map[string]bool{}
	for _, r := range first {
		if r.Source != Obtained {
			t.Errorf("first start: %s's certificate is %s, want %s", r.Peer, r.Source, Obtained)
		}
		serials[r.Serial] = true
	}
	if len(serials) != len(first) {
		t.Errorf("%d serials for %d hosts", len(serials), len(first))
	}

	stats := f.Stats()
	again := run("restart")
	for peer, r := range again {
		if r.Source != FromStorage || r.Serial != first[peer].Serial {
			t.Errorf("restart: %s serves %s from %s, want %s from %s", peer, r.Serial, r.Source, first[peer].Serial, FromStorage)
		}
	}
	if d := statsDelta(f.Stats(), stats); d != (testforge.Stats{}) {
		t.Errorf("the restart cost requests to the broker, the CA or DNS: %+v", d)
	}
}

// childFleet is the child of TestFleetManyIdentities: it starts a host
// for each of the job's identities, job.Parallel at a time, reports what
// each serves, and closes it.
func childFleet(t *testing.T, job childJob, st certmagic.Storage, w *childWriter) {
	sem := make(chan struct{}, job.Parallel)
	var wg sync.WaitGroup
	for n := range job.Keys {
		key := job.key(t, n)
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			h, err := job.newHost(key, st)
			if err != nil {
				w.report(childReport{Event: "failed", Err: err.Error()})
				return
			}
			r, err := job.serving(h, 2*time.Minute)
			_ = h.Close()
			if err != nil {
				r = childReport{Event: "failed", Peer: h.ID().String(), Err: err.Error()}
			}
			w.report(r)
		})
	}
	wg.Wait()
}

// TestFleetKilledHoldingLock: a process is killed (SIGKILL) in the middle
// of an issuance, holding the issuance lock in the database: its
// finalization is held at the CA proxy, after it stored the pending order
// (the order's URL and the certificate key). Another process with the same
// identity takes the lock once the dead one's lease (2 s) has run out, takes
// up the pending order and finalizes it: no new order, no registration
// with the broker, and one certificate for the name in all, since the dead
// process's finalization never reached the CA.
func TestFleetKilledHoldingLock(t *testing.T) {
	const lease = 2 * time.Second
	schema := newPostgresSchema(t)
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	key := genKey(t, crypto.Ed25519)
	held, release := make(chan struct{}), make(chan struct{})
	var holding atomic.Bool
	ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/finalize-order/") || !holding.CompareAndSwap(false, true) {
			return false
		}
		close(held)
		<-release
		problem(w, http.StatusServiceUnavailable, "urn:ietf:params:acme:error:serverInternal", "the process that sent this is gone", "")
		return true
	})
	var once sync.Once
	releaseOnce := func() { once.Do(func() { close(release) }) }
	t.Cleanup(releaseOnce) // before the proxy closes

	job := postgresJob(t, f, ca, "serve", schema, key)
	job.Lease = lease
	a := startChild(t, job)
	select {
	case <-held:
	case <-time.After(time.Minute):
		t.Fatalf("the child's finalization did not come; its output:\n%s", a.output())
	}
	st := openPostgres(t, schema, postgres.WithLease(lease))
	ps := &pairStore{s: st, issuerKey: issuerKey(ca.URL), name: certName(idOf(t, key), f.Domain), log: slog.New(slog.DiscardHandler)}
	po, _, err := ps.loadPending(t.Context())
	if err != nil || po.Order == "" {
		t.Fatalf("no pending order with its URL stored before the finalization: %+v, %v", po, err)
	}
	a.kill(t)
	killed := time.Now()
	releaseOnce()
	stats, before := f.Stats(), len(ca.Requests())

	clk := newClockAtNow()
	clk.SetHorizon(clk.Now().Add(time.Minute))
	r := startRig(t, f, clk, []libp2p.Option{libp2p.Identity(key)}, nil, WithStorage(st), WithCA(ca.URL, ca.Roots))
	c := r.waitLoaded(t)
	t.Logf("the certificate was served %v after the kill (lease %v)", time.Since(killed).Round(time.Millisecond), lease)

	after := ca.Requests()[before:]
	finalized := 0
	for _, q := range ca.Requests() {
		if q.Method == http.MethodPost && strings.HasPrefix(q.Path, "/finalize-order/") && !q.Faulted {
			finalized++
		}
	}
	got := map[string]int{
		"new orders":    count(after, http.MethodPost, "/order-plz"),
		"new accounts":  count(after, http.MethodPost, "/sign-me-up"),
		"registrations": f.Stats().Registered - stats.Registered,
		"finalizations": finalized,
	}
	want := map[string]int{"new orders": 0, "new accounts": 0, "registrations": 0, "finalizations": 1}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%d %s, want %d", got[k], k, w)
		}
	}
	if !strings.HasPrefix(po.Order, strings.TrimSuffix(ca.URL, "/dir")) {
		t.Errorf("pending order %s is not at the CA proxy", po.Order)
	}
	recorded, err := ps.issuances(t.Context(), clk.Now())
	if err != nil || len(recorded) != 1 || recorded[0].Serial != c.leaf.SerialNumber.Text(16) {
		t.Errorf("issuances recorded: %+v (%v), want the one certificate", recorded, err)
	}
	r.close(t)
}

// TestFleetDatabaseRestart: the database is stopped and started again
// while one host serves its certificate, another is in the middle of an
// issuance (holding the lock, its finalization held at the CA proxy), and a
// third starts its first attempt. TLS handshakes with the serving host
// never fail; its renewal, falling due during the outage, fails with one
// warning and keeps the certificate in use; the issuance in the middle completes
// and is stored once the database is back; and the attempts that failed
// succeed at their next scheduled retry, with no restart or kick.
func TestFleetDatabaseRestart(t *testing.T) {
	ctl := os.Getenv("AUTOTLS_TEST_POSTGRES_CTL")
	testPostgresURL(t)
	if ctl == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("AUTOTLS_TEST_POSTGRES_CTL is not set in CI: .ci/run must start PostgreSQL with .ci/postgres.sh")
		}
		t.Skip("AUTOTLS_TEST_POSTGRES_CTL is not set: run with `bash .ci/postgres.sh go test .` to restart the server")
	}
	pgtest.Exclusive(t) // no other package's test uses the server meanwhile
	schema := newPostgresSchema(t)
	server := func(arg string) {
		t.Helper()
		if out, err := exec.CommandContext(t.Context(), ctl, arg).CombinedOutput(); err != nil {
			t.Fatalf("%s %s: %v\n%s", ctl, arg, err, out)
		}
	}
	f := startForge(t, testforge.Config{})
	ca := startCAProxy(t, f)
	leaks := leakCheck(t)
	st := openPostgres(t, schema, postgres.WithTimeout(2*time.Second), postgres.WithLogger(slog.New(slog.NewTextHandler(t.Output(), nil))))
	start := func(edit func(*manager)) *faultRig {
		clk := newClockAtNow()
		clk.SetHorizon(clk.Now().Add(time.Minute))
		r := startRig(t, f, clk, nil, edit, WithStorage(st), WithCA(ca.URL, ca.Roots))
		r.closers = append(r.closers, ca.Close)
		return r
	}

	// x: serving; its renewal falls due during the outage (no ARI poll
	// first: renewal with a third of the lifetime left).
	x := start(func(m *manager) { m.ariFirstPoll = 10 * 365 * 24 * time.Hour })
	served := x.waitLoaded(t)
	due := renewAt(served.leaf)
	sni := "127-0-0-1." + testforge.PeerLabel(x.h.ID()) + "." + f.Domain
	var xAddr string
	for _, a := range x.h.Network().ListenAddresses() {
		if isForgeListenAddr(a, f.Domain) {
			xAddr = tcpHostPort(t, a)
		}
	}
	// Handshakes with x, every 10 ms, until the end.
	stop := make(chan struct{})
	var handshakes, failed atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			if _, err := tlsHandshake(xAddr, sni, f.IssuerRoots); err != nil {
				if failed.Add(1) == 1 {
					t.Errorf("TLS handshake with the serving host: %v", err)
				}
			}
			handshakes.Add(1)
		}
	})
	var stopOnce sync.Once
	stopHandshakes := func() { stopOnce.Do(func() { close(stop); wg.Wait() }) }
	defer stopHandshakes()

	// y: in the middle of an issuance, its finalization held.
	held, release := make(chan struct{}), make(chan struct{})
	var holding atomic.Bool
	ca.SetFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/finalize-order/") && holding.CompareAndSwap(false, true) {
			close(held)
			<-release
		}
		return false
	})
	var once sync.Once
	releaseOnce := func() { once.Do(func() { close(release) }) }
	t.Cleanup(releaseOnce)
	y := start(nil)
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatalf("y's finalization did not come; log:\n%s", y.logs)
	}
	// z: its first attempt waits for the broker's health check.
	healthHeld, healthRelease := make(chan struct{}), make(chan struct{})
	var healthHolding atomic.Bool
	f.SetBrokerFault(func(_ http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == healthPath && healthHolding.CompareAndSwap(false, true) {
			close(healthHeld)
			<-healthRelease
		}
		return false
	})
	defer f.SetBrokerFault(nil)
	var healthOnce sync.Once
	releaseHealth := func() { healthOnce.Do(func() { close(healthRelease) }) }
	t.Cleanup(releaseHealth) // before the forge closes
	z := start(nil)
	select {
	case <-healthHeld:
	case <-time.After(30 * time.Second):
		t.Fatalf("z's health check did not come; log:\n%s", z.logs)
	}

	server("stop")
	restarted := false
	defer func() {
		if !restarted {
			server("start")
		}
	}()
	releaseHealth() // z's first attempt meets the outage
	z.fails.last(t)
	z.clk.WaitParked(t, 30*time.Second)
	x.clk.SetHorizon(due.Add(5 * time.Minute)) // so does x's renewal
	x.fails.last(t)
	x.clk.WaitParked(t, 30*time.Second)
	for _, r := range []*faultRig{x, z} {
		w := warnings(r)
		if len(w) != 1 || !strings.Contains(w[0].msg, "storage") {
			t.Errorf("%d warnings, want one about storage:\n%s", len(w), r.logs)
		}
	}
	if x.m.cert.Load() != served {
		t.Error("x's certificate changed during the outage")
	}
	server("start")
	restarted = true
	t.Logf("%d handshakes with x by the time the server was back, none failed", handshakes.Load())

	releaseOnce()
	yc := y.waitLoaded(t)
	if c, err := y.m.store.loadPair(t.Context(), y.clk.Now()); err != nil || !c.leaf.Equal(yc.leaf) {
		t.Errorf("y's certificate is not stored: %v", err)
	}
	// Their next attempts, at the times they set, without a kick.
	for _, r := range []*faultRig{x, z} {
		r.clk.SetHorizon(r.clk.Now().Add(retryCap))
	}
	x.waitRenewed(t, served)
	z.waitLoaded(t)
	for _, r := range []*faultRig{x, y, z} {
		for _, l := range warnings(r) {
			if strings.Contains(l.msg, "could not release the storage lock") {
				t.Errorf("a lock was not released: %s", l.text)
			}
		}
	}
	stopHandshakes()
	if failed.Load() != 0 {
		t.Errorf("%d of %d handshakes failed", failed.Load(), handshakes.Load())
	}
	for _, r := range []*faultRig{x, y, z} {
		r.close(t)
	}
	st.Close() // its goroutines giving back locks that failed attempts may have taken
	leaks()
}
