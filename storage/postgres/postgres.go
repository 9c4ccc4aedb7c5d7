// Package postgres is a [certmagic.Storage] in PostgreSQL, for a fleet of
// hosts that share certificates, keys, ACME accounts and locks.
//
// [New] connects with a pgxpool connection string, creates its tables if
// they are missing, and returns a [*Storage] that implements
// [certmagic.Storage], [certmagic.TryLocker] and [certmagic.LockLeaseRenewer].
// Pass it to autotls.WithStorage on every host of the fleet, and Close it
// after the hosts.
//
// # Tables
//
// Values live in autotls_files (key, value, modified), locks in
// autotls_locks (name, owner, expires_at, fence), and fencing tokens come
// from the sequence autotls_fence: [CreateTables] is the SQL, for operators
// who create them themselves. [WithSchema] puts them in a schema of their
// own. Keys are '/'-separated paths; a directory is a key prefix, as in
// [certmagic.FileStorage].
//
// # PgBouncer
//
// The storage keeps no session state: no advisory locks, no session-level
// SET, no named prepared statements. Every statement is sent with pgx's
// [pgx.QueryExecModeExec] (one round trip, unnamed statement, text
// parameters), so it works behind PgBouncer in transaction mode. A
// connection string that sets default_query_exec_mode (simple_protocol, for
// instance) keeps its own choice. Pool settings such as pool_max_conns go in
// the connection string too.
//
// # Locks
//
// A lock is a row holding a random owner token and a lease that ends at
// expires_at, on the database's clock. Lock inserts the row, or takes over
// one whose lease has ended, in one statement; otherwise it polls, from
// 25 ms growing to 1 s, until it wins or its context is done. While a lock is
// held, a goroutine renews its lease every third of the lease ([WithLease],
// default 1 minute), so a holder that dies loses its locks after at most one
// lease, and a live holder keeps them as long as it needs. Unlock deletes the
// row only if the owner token is still ours.
//
// Each acquisition takes a new fencing token from a sequence, greater than
// every token handed out before, for any lock: [Storage.Fence] tells the
// holder its token, to pass along to whatever it writes so that a writer
// whose lease ended without it noticing can be refused.
//
// # Outages
//
// Every call is bounded by its context and by [WithTimeout] (default 10 s)
// and returns an error wrapping the cause when the database cannot be
// reached. A lock's renewer logs one warning when renewal starts failing,
// keeps trying, logs again when it succeeds, and gives up (with an error
// line) once the lease has run out, after which another host may take the
// lock. Lock and Unlock return errors during an outage; a lock whose Unlock
// failed is free again when its lease ends, and one that a failed Lock may
// have taken is given back once the database answers again.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// CreateTables is the SQL that [New] runs, in one transaction and in the
// schema of [WithSchema] if any, when a table or the sequence is missing.
// Operators who create them themselves run it with search_path set to that
// schema; a [Storage] that finds them needs no CREATE privilege, only
// SELECT, INSERT, UPDATE and DELETE on the tables and USAGE on the sequence.
const CreateTables = `CREATE TABLE IF NOT EXISTS autotls_files (
	key      text COLLATE "C" PRIMARY KEY, -- byte order: a directory's keys are one index range
	value    bytea NOT NULL,
	modified timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS autotls_locks (
	name       text PRIMARY KEY,
	owner      text NOT NULL,        -- random token of the holder
	expires_at timestamptz NOT NULL, -- end of the lease, on the database's clock
	fence      bigint NOT NULL       -- fencing token, from autotls_fence
);
CREATE SEQUENCE IF NOT EXISTS autotls_fence AS bigint;
`

// Storage is a [certmagic.Storage] in PostgreSQL; see the package
// documentation. Create it with [New]; it is safe for concurrent use.
type Storage struct {
	pool    *pgxpool.Pool
	q       queries
	schema  string
	lease   time.Duration
	timeout time.Duration
	log     *slog.Logger

	// ctx is cancelled by Close, which stops every renewer.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	held   map[string]*heldLock // by lock name
	closed bool
}

var (
	_ certmagic.Storage          = (*Storage)(nil)
	_ certmagic.TryLocker        = (*Storage)(nil)
	_ certmagic.LockLeaseRenewer = (*Storage)(nil)
)

// An Option configures [New].
type Option func(*config)

type config struct {
	schema  string
	lease   time.Duration
	timeout time.Duration
	log     *slog.Logger
}

// WithSchema keeps the tables in the named schema, created if missing.
// Without it, they are created and found through the connection's
// search_path (normally in public).
func WithSchema(name string) Option {
	return func(c *config) { c.schema = name }
}

// WithLease sets how long a lock outlives its holder's last renewal.
// Without it (or with zero), the lease is 1 minute. A shorter lease hands
// the locks of a dead host over sooner but costs a renewal every lease/3 per
// held lock, and must stay well above the database's round trip and the
// pauses of a loaded host; values below 100 ms are raised to 100 ms.
func WithLease(d time.Duration) Option {
	return func(c *config) { c.lease = d }
}

// WithTimeout bounds each database call (each attempt, within Lock), on top
// of the caller's context. Without it (or with zero), the bound is 10
// seconds. It is also the connect timeout unless the connection string sets
// connect_timeout.
func WithTimeout(d time.Duration) Option {
	return func(c *config) { c.timeout = d }
}

// WithLogger sets the logger for lock renewal problems. Without it (or with
// nil), the storage logs to [slog.Default].
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.log = l }
}

// New connects to the database at connString (a pgx or libpq connection
// string or URL, such as "postgres://user@host/db"), creates the tables if
// they are missing, and returns the storage. Close it when done.
func New(ctx context.Context, connString string, opts ...Option) (*Storage, error) {
	c := config{lease: time.Minute, timeout: 10 * time.Second}
	for _, o := range opts {
		o(&c)
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	if c.lease <= 0 {
		c.lease = time.Minute
	}
	c.lease = max(c.lease, 100*time.Millisecond)
	if c.timeout <= 0 {
		c.timeout = 10 * time.Second
	}

	pc, err := pgxpool.ParseConfig(connString)
	if err != nil {
		// pgx's parse errors redact the password.
		return nil, fmt.Errorf("postgres: parsing the connection string: %w", err)
	}
	if !strings.Contains(connString, "default_query_exec_mode") {
		pc.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec
	}
	if pc.ConnConfig.ConnectTimeout <= 0 {
		// Bounds connection attempts that pgxpool continues in the
		// background after the call that started them gave up.
		pc.ConnConfig.ConnectTimeout = c.timeout
	}
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("postgres: creating the connection pool: %w", err)
	}
	s := &Storage{
		pool:    pool,
		q:       newQueries(c.schema),
		schema:  c.schema,
		lease:   c.lease,
		timeout: c.timeout,
		log:     c.log,
		held:    make(map[string]*heldLock),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if err := s.createTables(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// createTables runs [CreateTables] unless its objects all exist already.
func (s *Storage) createTables(ctx context.Context) error {
	ctx, cancel := s.callCtx(ctx)
	defer cancel()
	var exist bool
	err := s.pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL AND to_regclass($3) IS NOT NULL`,
		s.q.files, s.q.locks, s.q.fence).Scan(&exist)
	if err != nil {
		return fmt.Errorf("postgres: looking for the tables: %w", err)
	}
	if exist {
		return nil
	}
	// Hosts starting together race to create the tables; the losers see a
	// unique violation (CREATE ... IF NOT EXISTS is not atomic) and retry,
	// and then find them.
	for attempt := 0; ; attempt++ {
		err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			if s.schema != "" {
				if _, err := tx.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+quoteIdent(s.schema)); err != nil {
					return err
				}
				// SET LOCAL ends with the transaction: no session state.
				if _, err := tx.Exec(ctx, "SET LOCAL search_path TO "+quoteIdent(s.schema)); err != nil {
					return err
				}
			}
			_, err := tx.Exec(ctx, CreateTables)
			return err
		})
		var pgErr *pgconn.PgError
		if err == nil || attempt == 2 || !errors.As(err, &pgErr) || !raceCode(pgErr.Code) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("postgres: creating the tables: %w", err)
	}
	return nil
}

// raceCode reports whether a PostgreSQL error code is one that concurrent
// CREATE ... IF NOT EXISTS statements can cause.
func raceCode(code string) bool {
	switch code {
	case "23505", // unique_violation, in the catalogs
		"42P06", // duplicate_schema
		"42P07", // duplicate_table
		"42710": // duplicate_object
		return true
	}
	return false
}

// Close stops renewing the locks this storage holds and waits for its
// renewers to return, then closes the connection pool, waiting for calls
// in progress. Locks still held are not released: they lapse when their
// lease ends, as if the process had died; Unlock them first to hand them
// over at once. Close is safe to call more than once; every other method
// fails after it.
func (s *Storage) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	s.pool.Close()
}

// String identifies the storage in certmagic's log lines (without the
// connection string, which may hold a password).
func (s *Storage) String() string {
	if s.schema == "" {
		return "PostgresStorage"
	}
	return "PostgresStorage:" + s.schema
}

// callCtx bounds one database call by the storage's timeout.
func (s *Storage) callCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.timeout)
}

// queries holds the statements, with the table names qualified by the
// schema if any.
type queries struct {
	files, locks, fence string // qualified names

	store, storeConflict, load, stat, exists, del, list string

	acquire, renew, unlock string
}

func newQueries(schema string) queries {
	name := func(n string) string {
		if schema == "" {
			return n
		}
		return quoteIdent(schema) + "." + n
	}
	f, l, seq := name("autotls_files"), name("autotls_locks"), name("autotls_fence")
	// The prefix conditions read "key >= dir/ AND key < dir0": '0' follows
	// '/' in byte order, so this is exactly the keys below dir, one range
	// of the primary key's index, with no LIKE pattern to escape. Below the
	// root, the upper bound is NULL: no bound.
	under := func(lo, hi string) string {
		return "(key >= " + lo + " AND (key < " + hi + " OR " + hi + "::text IS NULL))"
	}
	return queries{
		files: f, locks: l, fence: seq,

		// $1 key, $2 value, $3 key+"/", $4 key+"0", $5 the key's ancestors.
		// A key cannot be both a file and a directory, as in a file system.
		store: `INSERT INTO ` + f + ` (key, value, modified)
			SELECT $1, $2, now()
			WHERE NOT EXISTS (SELECT 1 FROM ` + f + ` WHERE ` + under("$3", "$4") + ` OR key = ANY($5::text[]))
			ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, modified = EXCLUDED.modified`,
		storeConflict: `SELECT EXISTS (SELECT 1 FROM ` + f + ` WHERE ` + under("$1", "$2") + `)`,
		load:          `SELECT value FROM ` + f + ` WHERE key = $1`,
		// A file, or else a directory.
		stat: `SELECT octet_length(value), modified, true FROM ` + f + ` WHERE key = $1
			UNION ALL
			SELECT 0, NULL, false WHERE EXISTS (SELECT 1 FROM ` + f + ` WHERE ` + under("$2", "$3") + `)`,
		exists: `SELECT EXISTS (SELECT 1 FROM ` + f + ` WHERE key = $1 OR ` + under("$2", "$3") + `)`,
		del:    `DELETE FROM ` + f + ` WHERE key = $1 OR ` + under("$2", "$3"),
		list:   `SELECT key FROM ` + f + ` WHERE key = $1 OR ` + under("$2", "$3") + ` ORDER BY key`,

		// $1 name, $2 owner, $3 lease in milliseconds. The row is ours if
		// there was none or its lease had ended; the fencing token is new
		// either way. now() is the database's clock, the same for every host.
		acquire: `INSERT INTO ` + l + ` AS l (name, owner, expires_at, fence)
			VALUES ($1, $2, now() + $3::bigint * interval '1 millisecond', nextval('` + strings.ReplaceAll(seq, "'", "''") + `'))
			ON CONFLICT (name) DO UPDATE
				SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, fence = EXCLUDED.fence
				WHERE l.expires_at < now()
			RETURNING fence`,
		// Extends, never shortens: RenewLockLease may have asked for more.
		renew: `UPDATE ` + l + ` SET expires_at = greatest(expires_at, now() + $3::bigint * interval '1 millisecond')
			WHERE name = $1 AND owner = $2`,
		unlock: `DELETE FROM ` + l + ` WHERE name = $1 AND owner = $2`,
	}
}

// quoteIdent quotes a PostgreSQL identifier.
func quoteIdent(s string) string {
	return pgx.Identifier{s}.Sanitize()
}
