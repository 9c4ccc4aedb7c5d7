package postgres_test

import (
	"bytes"
	"testing"

	"github.com/caddyserver/certmagic"
	"github.com/p2ptls/autotls/storage"
)

// benchStores runs bench as two sub-benchmarks: on PostgreSQL (skipped
// without AUTOTLS_TEST_POSTGRES_URL) and, for comparison, on storage.Dir.
//
//	bash .ci/postgres.sh go test -run '^$' -bench . ./storage/postgres/
func benchStores(b *testing.B, bench func(b *testing.B, s certmagic.Storage)) {
	b.Run("postgres", func(b *testing.B) {
		bench(b, open(b, testURL(b), newSchema(b)))
	})
	b.Run("dir", func(b *testing.B) {
		s, err := storage.Dir(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		bench(b, s)
	})
}

// certificate is a value of the size of a certificate chain in PEM.
var certificate = bytes.Repeat([]byte("MIIB"), 1024)

func BenchmarkLoad(b *testing.B) {
	benchStores(b, func(b *testing.B, s certmagic.Storage) {
		const key = "certificates/acme-v02.api.letsencrypt.org-directory/wildcard_.k51.libp2p.direct/wildcard_.k51.libp2p.direct.crt"
		if err := s.Store(b.Context(), key, certificate); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := s.Load(b.Context(), key); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkStore(b *testing.B) {
	benchStores(b, func(b *testing.B, s certmagic.Storage) {
		const key = "certificates/acme-v02.api.letsencrypt.org-directory/wildcard_.k51.libp2p.direct/wildcard_.k51.libp2p.direct.crt"
		b.ReportAllocs()
		for b.Loop() {
			if err := s.Store(b.Context(), key, certificate); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkLockUnlock(b *testing.B) {
	benchStores(b, func(b *testing.B, s certmagic.Storage) {
		b.ReportAllocs()
		for b.Loop() {
			if err := s.Lock(b.Context(), lockName); err != nil {
				b.Fatal(err)
			}
			if err := s.Unlock(b.Context(), lockName); err != nil {
				b.Fatal(err)
			}
		}
	})
}
