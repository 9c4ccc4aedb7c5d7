package postgres_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"crypto/rand"

	"github.com/caddyserver/certmagic"
	"github.com/jackc/pgx/v5"
	"github.com/p2ptls/autotls/storage/postgres"
	"github.com/p2ptls/autotls/storage/storagetest"
)

// urlEnv names the variable that points the tests at a PostgreSQL database
// in which they may create and drop schemas and roles.
const urlEnv = "AUTOTLS_TEST_POSTGRES_URL"

// testURL returns the database URL of the tests. Without one they skip,
// except in CI (CI=true), where the database is part of the run.
func testURL(tb testing.TB) string {
	tb.Helper()
	u := os.Getenv(urlEnv)
	if u != "" {
		return u
	}
	how := "run them with `bash .ci/postgres.sh go test ./storage/postgres/` (starts a throwaway " +
		"PostgreSQL on loopback), or set " + urlEnv + "=postgres://user@127.0.0.1:5432/db?sslmode=disable " +
		"(a database where the user may create schemas and roles)"
	if os.Getenv("CI") == "true" {
		tb.Fatalf("%s is not set in CI: .ci/run must start PostgreSQL; %s", urlEnv, how)
	}
	tb.Skipf("%s is not set: PostgreSQL tests skipped; %s", urlEnv, how)
	return ""
}

// admin runs SQL on the test database outside of any Storage.
func admin(tb testing.TB, sql string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, testURL(tb))
	if err != nil {
		tb.Fatalf("connecting: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql); err != nil {
		tb.Fatalf("%s: %v", sql, err)
	}
}

// newSchema returns the name of a schema of the test's own, which it drops
// with everything in it at cleanup, after the stores opened later closed.
func newSchema(tb testing.TB) string {
	tb.Helper()
	name := "autotls_test_" + strings.ToLower(rand.Text()[:12])
	tb.Cleanup(func() { admin(tb, "DROP SCHEMA IF EXISTS "+name+" CASCADE") })
	return name
}

// testLogger logs to the test's output.
func testLogger(tb testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tb.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// open returns a Storage on the tables in schema, reached at dbURL, closed
// at cleanup.
func open(tb testing.TB, dbURL, schema string, opts ...postgres.Option) *postgres.Storage {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	opts = append([]postgres.Option{postgres.WithSchema(schema), postgres.WithLogger(testLogger(tb))}, opts...)
	s, err := postgres.New(ctx, dbURL, opts...)
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	tb.Cleanup(s.Close)
	return s
}

// withHost returns dbURL with its host and port replaced by addr.
func withHost(tb testing.TB, dbURL, addr string) string {
	tb.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		tb.Fatalf("parsing %s: %v", urlEnv, err)
	}
	u.Host = addr
	return u.String()
}

// withUser returns dbURL with its user replaced by user, without password.
func withUser(tb testing.TB, dbURL, user string) string {
	tb.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		tb.Fatalf("parsing %s: %v", urlEnv, err)
	}
	u.User = url.User(user)
	return u.String()
}

// TestConformance runs the storagetest suite, with a second pool over the
// same schema as the other process, and Close without Unlock as a holder
// that died.
func TestConformance(t *testing.T) {
	dbURL := testURL(t)
	// Short for AbandonedLock, long enough that a renewer delayed by a
	// loaded machine does not let a lock go in the other subtests.
	const lease = 5 * time.Second
	var schemas sync.Map // *postgres.Storage → its schema
	storagetest.Run(t, func(t *testing.T) certmagic.Storage {
		schema := newSchema(t)
		s := open(t, dbURL, schema, postgres.WithLease(lease))
		schemas.Store(s, schema)
		return s
	}, storagetest.Options{
		Shared: func(t *testing.T, s certmagic.Storage) certmagic.Storage {
			schema, _ := schemas.Load(s)
			return open(t, dbURL, schema.(string), postgres.WithLease(lease))
		},
		Abandon: func(t *testing.T, s certmagic.Storage) { s.(*postgres.Storage).Close() },
		Lease:   lease,
	})
}

// TestStoreFileOrDirectory: as in a file system, a key is a file or a
// directory, never both.
func TestStoreFileOrDirectory(t *testing.T) {
	t.Parallel()
	s := open(t, testURL(t), newSchema(t))
	ctx := t.Context()
	if err := s.Store(ctx, "a/b", []byte("file")); err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]string{
		"a":     "key is a directory",
		"a/b/c": "a directory above it is a file",
		"":      "empty key",
	} {
		if err := s.Store(ctx, key, nil); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Store(%q) = %v, want an error saying %q", key, err, want)
		}
	}
}

// TestRoot: the root ("") is a directory that always exists; List and
// Delete of it cover every key.
func TestRoot(t *testing.T) {
	t.Parallel()
	s := open(t, testURL(t), newSchema(t))
	ctx := t.Context()
	if keys, err := s.List(ctx, "", true); err != nil || len(keys) != 0 {
		t.Errorf("List of the empty root = %q, %v; want nothing", keys, err)
	}
	for _, k := range []string{"a/b", "c"} {
		if err := s.Store(ctx, k, []byte(k)); err != nil {
			t.Fatal(err)
		}
	}
	if keys, err := s.List(ctx, "", false); err != nil || fmt.Sprint(keys) != "[a c]" {
		t.Errorf("List(root) = %q, %v; want [a c]", keys, err)
	}
	if keys, err := s.List(ctx, "", true); err != nil || fmt.Sprint(keys) != "[a a/b c]" {
		t.Errorf("List(root, recursive) = %q, %v; want [a a/b c]", keys, err)
	}
	if info, err := s.Stat(ctx, ""); err != nil || info.IsTerminal || !s.Exists(ctx, "") {
		t.Errorf("Stat(root) = %+v, %v; want a directory that exists", info, err)
	}
	if err := s.Delete(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if keys, err := s.List(ctx, "", true); err != nil || len(keys) != 0 {
		t.Errorf("List after Delete(root) = %q, %v; want nothing", keys, err)
	}
}

// TestNewConcurrently: hosts starting together on an empty database all
// get a working storage, though they race to create the tables.
func TestNewConcurrently(t *testing.T) {
	t.Parallel()
	dbURL, schema := testURL(t), newSchema(t)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			s, err := postgres.New(t.Context(), dbURL, postgres.WithSchema(schema))
			if err != nil {
				errs <- err
				return
			}
			defer s.Close()
			errs <- s.Store(t.Context(), "k", []byte("v"))
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// TestOperatorCreatedTables: tables created by an operator from
// CreateTables serve a role that may use them but not create anything.
func TestOperatorCreatedTables(t *testing.T) {
	t.Parallel()
	dbURL, schema := testURL(t), newSchema(t)
	role := schema + "_user"
	admin(t, "CREATE SCHEMA "+schema+"; SET search_path TO "+schema+";\n"+postgres.CreateTables)
	admin(t, "CREATE ROLE "+role+" LOGIN;"+
		" GRANT USAGE ON SCHEMA "+schema+" TO "+role+";"+
		" GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "+schema+" TO "+role+";"+
		" GRANT USAGE ON ALL SEQUENCES IN SCHEMA "+schema+" TO "+role)
	t.Cleanup(func() { admin(t, "DROP OWNED BY "+role+"; DROP ROLE "+role) })

	s := open(t, withUser(t, dbURL, role), schema)
	ctx := t.Context()
	if err := s.Store(ctx, "certs/a.crt", []byte("pem")); err != nil {
		t.Fatalf("Store: %v", err)
	}
	if v, err := s.Load(ctx, "certs/a.crt"); err != nil || string(v) != "pem" {
		t.Fatalf("Load = %q, %v", v, err)
	}
	if err := s.Lock(ctx, "l"); err != nil {
		t.Fatalf("Lock: %v", err)
	}
	if err := s.Unlock(ctx, "l"); err != nil {
		t.Fatalf("Unlock: %v", err)
	}

	// The same role cannot create tables: New says so for a new schema.
	_, err := postgres.New(ctx, withUser(t, dbURL, role), postgres.WithSchema(schema+"_new"))
	if err == nil || !strings.Contains(err.Error(), "creating the tables") {
		t.Errorf("New without CREATE privilege on a new schema = %v, want an error creating the tables", err)
	}
}

// TestBadConnString: a malformed connection string is an error, not a
// panic, and the error does not repeat the password.
func TestBadConnString(t *testing.T) {
	t.Parallel()
	_, err := postgres.New(t.Context(), "postgres://user:s3cret@127.0.0.1:notaport/db")
	if err == nil {
		t.Fatal("New accepted a malformed connection string")
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Errorf("error repeats the password: %v", err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error is a timeout, want a parse error: %v", err)
	}
}

// TestPgBouncer runs the storagetest suite through PgBouncer in transaction
// mode (AUTOTLS_TEST_PGBOUNCER_URL, set by .ci/postgres.sh), where
// consecutive statements of a client may run on different server
// connections: nothing may rely on session state or prepared statements.
func TestPgBouncer(t *testing.T) {
	const env = "AUTOTLS_TEST_PGBOUNCER_URL"
	testURL(t) // the schemas are dropped directly
	bouncer := os.Getenv(env)
	if bouncer == "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is not set in CI: .ci/postgres.sh starts PgBouncer", env)
		}
		t.Skipf("%s is not set: run with `bash .ci/postgres.sh go test ./storage/postgres/`", env)
	}
	var schemas sync.Map // *postgres.Storage → its schema
	storagetest.Run(t, func(t *testing.T) certmagic.Storage {
		schema := newSchema(t)
		s := open(t, bouncer, schema, postgres.WithLease(5*time.Second))
		schemas.Store(s, schema)
		return s
	}, storagetest.Options{
		Shared: func(t *testing.T, s certmagic.Storage) certmagic.Storage {
			schema, _ := schemas.Load(s)
			return open(t, bouncer, schema.(string), postgres.WithLease(5*time.Second))
		},
	})
}
