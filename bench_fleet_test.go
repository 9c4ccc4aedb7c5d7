package autotls

// Benchmarks of a fleet's storage: PostgreSQL (storage/postgres) against
// storage.Memory in the same run, for docs/fleets.md. PostgreSQL's cases
// need AUTOTLS_TEST_POSTGRES_URL (`bash .ci/postgres.sh go test -bench
// Storage -run '^$' .`); without it they are skipped.

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/jackc/pgx/v5"

	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
)

// storageBackend is a storage to benchmark: a new, empty one per call.
type storageBackend struct {
	name string
	open func(b *testing.B) (st certmagic.Storage, schema string)
}

func storageBackends() []storageBackend {
	return []storageBackend{
		{"memory", func(*testing.B) (certmagic.Storage, string) { return storage.Memory(), "" }},
		{"postgres", func(b *testing.B) (certmagic.Storage, string) {
			schema := newPostgresSchema(b)
			return openPostgres(b, schema), schema
		}},
	}
}

// BenchmarkStorageIssue is the time to certificate for a fresh identity
// (libp2p.New to EvtCertificateLoaded, as BenchmarkTimeToCertificate) with
// each storage, and what the storage does meanwhile: calls/op, and the
// prep-ms (lock, storage checks, key) and store-ms (store and serve)
// phases that the storage lengthens. For PostgreSQL, rows/node and
// bytes/node are what one node adds to autotls_files (key and value
// lengths; the shared ACME account apart), and disk-bytes/node the
// table's size with its index and TOAST over the nodes.
func BenchmarkStorageIssue(b *testing.B) {
	for _, be := range storageBackends() {
		b.Run(be.name, func(b *testing.B) {
			f := startForge(b, testforge.Config{})
			st, schema := be.open(b)
			cs := &countingStorage{Storage: st, n: &storageCounts{}}
			tracedIssue(b, f, storage.Memory()) // warm up, apart
			var times, prep, store []float64
			calls := int64(0)
			b.ResetTimer()
			for range b.N {
				n0 := cs.n.total()
				t, _ := tracedIssue(b, f, cs)
				calls += cs.n.total() - n0
				times = append(times, ms(t.loaded.Sub(t.start)))
				p := t.phases()
				prep = append(prep, p[2])
				store = append(store, p[len(p)-1])
			}
			b.StopTimer()
			b.ReportMetric(median(times), "ms")
			b.ReportMetric(mean(prep), "prep-ms")
			b.ReportMetric(mean(store), "store-ms")
			b.ReportMetric(float64(calls)/float64(b.N), "calls/op")
			if schema != "" {
				rows, bytes, disk := tableSize(b, schema)
				b.ReportMetric(rows/float64(b.N), "rows/node")
				b.ReportMetric(bytes/float64(b.N), "bytes/node")
				b.ReportMetric(disk/float64(b.N), "disk-bytes/node")
			}
		})
	}
}

// tableSize returns the rows of autotls_files in schema and their key
// and value bytes, the ACME accounts apart, and the table's size on disk.
func tableSize(b *testing.B, schema string) (rows, bytes, disk float64) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, testPostgresURL(b))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(ctx)
	files := pgx.Identifier{schema, "autotls_files"}.Sanitize()
	err = conn.QueryRow(ctx, fmt.Sprintf(`SELECT count(*), coalesce(sum(octet_length(key) + octet_length(value)), 0),
		pg_total_relation_size('%s') FROM %s WHERE key NOT LIKE 'autotls/acme/%%/accounts/%%'`, files, files)).Scan(&rows, &bytes, &disk)
	if err != nil {
		b.Fatal(err)
	}
	return rows, bytes, disk
}

// BenchmarkStorageRestart is a restart with a stored certificate (libp2p.New
// to the browser address announced, as BenchmarkRestart) with each
// storage, and the storage calls it makes.
func BenchmarkStorageRestart(b *testing.B) {
	for _, be := range storageBackends() {
		b.Run(be.name, func(b *testing.B) {
			f := startForge(b, testforge.Config{})
			st, _ := be.open(b)
			cs := &countingStorage{Storage: st, n: &storageCounts{}}
			key := benchKey(b)
			h := benchHost(b, f, key, WithStorage(cs))
			waitCert(b, h, time.Minute)
			_ = h.Close()
			var times []float64
			before, n0 := f.Stats(), cs.n.total()
			b.ResetTimer()
			for range b.N {
				h, d := restartHost(b, f, key, cs)
				times = append(times, ms(d))
				b.StopTimer()
				_ = h.Close()
				b.StartTimer()
			}
			b.StopTimer()
			d := statsDelta(f.Stats(), before)
			b.ReportMetric(median(times), "ms")
			b.ReportMetric(float64(cs.n.total()-n0)/float64(b.N), "calls/op")
			b.ReportMetric(float64(d.Health+d.Challenge+d.CA+d.DNS)/float64(b.N), "forge-req/op")
		})
	}
}

// BenchmarkStorageRenew is a renewal of the certificate in use (the run
// loop woken, to the new certificate served) with each storage, and the
// storage calls it makes.
func BenchmarkStorageRenew(b *testing.B) {
	for _, be := range storageBackends() {
		b.Run(be.name, func(b *testing.B) {
			f := startForge(b, testforge.Config{})
			st, _ := be.open(b)
			cs := &countingStorage{Storage: st, n: &storageCounts{}}
			var m *manager
			h := benchHost(b, f, benchKey(b), WithStorage(cs), withManager(func(x *manager) { m = x }))
			defer h.Close()
			sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
			if err != nil {
				b.Fatal(err)
			}
			defer sub.Close()
			nextCert(b, sub.Out(), time.Minute)
			var times []float64
			n0 := cs.n.total()
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				m.kick <- struct{}{}
				times = append(times, ms(nextCert(b, sub.Out(), time.Minute).Sub(start)))
			}
			b.StopTimer()
			b.ReportMetric(median(times), "ms")
			b.ReportMetric(float64(cs.n.total()-n0)/float64(b.N), "calls/op")
		})
	}
}
