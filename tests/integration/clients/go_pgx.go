// pgx (github.com/jackc/pgx/v4, Debian's golang-github-jackc-pgx-v4-dev) as Go applications use it:
// its default statement cache (named statements "lrupsc_<conn>_<n>", each prepared with Parse/Describe/
// Sync, then only bound), the describe-only cache (the unnamed statement described once, then
// Parse/Bind/Describe/Execute per query), no cache (the unnamed statement described, then bound in a
// group of its own), pgconn's ExecParams (no Describe of the statement at all), the simple protocol,
// Batch (many queries in one Sync), CopyFrom (binary COPY), transactions and savepoints, a statement
// whose result shape changes under it (pgx drops it from its cache on 0A000), context cancellation
// (pgx closes the connection and sends a CancelRequest) and PgConn.CancelRequest, Ping, DISCARD ALL and
// DEALLOCATE ALL sent by the application, SET and set_config, RuntimeParams, many types, and pgxpool
// with more goroutines than connections, for two tenants at once.
//
// DRIVER_CONFIG (JSON): {host, port, database, run, clients: {a: {user, password}, b: {...}}, context,
// admin, app_role}. Through the proxy `context` is null and each password is a token; directly it is
// {key, tenants: {a, b}} and the program sets each connection's signed tenant context itself, as the
// proxy would. `admin` is a superuser DSN straight to Postgres, for the tables of this run and the ALTER
// TABLE under a cached statement. Prints one JSON object per step.
package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgconn/stmtcache"
	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

func failure(err error) map[string]interface{} {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return map[string]interface{}{"code": pgErr.Code, "severity": pgErr.Severity, "message": pgErr.Message, "detail": pgErr.Detail,
			"hint": pgErr.Hint, "position": pgErr.Position, "internal_position": pgErr.InternalPosition, "internal_query": pgErr.InternalQuery,
			"where": pgErr.Where, "schema": pgErr.SchemaName, "table": pgErr.TableName, "column": pgErr.ColumnName,
			"data_type": pgErr.DataTypeName, "constraint": pgErr.ConstraintName, "routine": pgErr.Routine}
	}
	switch {
	case errors.Is(err, context.Canceled):
		return map[string]interface{}{"context": "canceled"}
	case errors.Is(err, context.DeadlineExceeded):
		return map[string]interface{}{"context": "deadline exceeded"}
	}
	return map[string]interface{}{"other": err.Error()}
}

// outcome is a value or the error, for steps that go on after an error.
func dsn(name string) string {
	c := cfg.Clients[name]
	return fmt.Sprintf("host=%s port=%d dbname=%s user=%s password='%s' sslmode=disable", cfg.Host, cfg.Port, cfg.Database,
		c.User, strings.ReplaceAll(c.Password, "'", "\\'"))
}

// The proof the proxy's context carries: "<expiry>:<hex HMAC-SHA256(key, '<pid>:<expiry>:<tenant>')>".
func setContext(ctx context.Context, conn *pgx.Conn, name string) error {
	if cfg.Context == nil {
		return nil
	}
	tenant := cfg.Context.Tenants[name]
	pid := conn.PgConn().PID()
	expires := time.Now().Unix() + 3600
	mac := hmac.New(sha256.New, []byte(cfg.Context.Key))
	fmt.Fprintf(mac, "%d:%d:%s", pid, expires, tenant)
	proof := fmt.Sprintf("%d:%s", expires, hex.EncodeToString(mac.Sum(nil)))
	_, err := conn.Exec(ctx, "SELECT set_config('app.current_tenant', $1, false), set_config('tenant_proxy.proof', $2, false)",
		pgx.QuerySimpleProtocol(true), tenant, proof)
	return err
}

// afterReset sets the context again on a direct run after the application's DISCARD ALL or RESET ALL,
// as the proxy does.
func afterReset(conn *pgx.Conn, name string) {
	if err := setContext(bg, conn, name); err != nil {
		panic(err)
	}
}

// What the server said to each connection besides results: notices, in order.
var notices = map[*pgconn.PgConn][]string{}
var noticesMu sync.Mutex

// heard returns the notices a connection got since the last call.
func heard(conn *pgx.Conn) []string {
	noticesMu.Lock()
	defer noticesMu.Unlock()
	got := notices[conn.PgConn()]
	delete(notices, conn.PgConn())
	if got == nil {
		return []string{}
	}
	return got
}

// reported is what the connection was last told of the settings Postgres reports (ParameterStatus).
func reported(conn *pgx.Conn) map[string]string {
	out := map[string]string{}
	for _, name := range []string{"application_name", "TimeZone", "DateStyle", "IntervalStyle", "client_encoding", "standard_conforming_strings", "integer_datetimes", "search_path"} {
		out[name] = conn.PgConn().ParameterStatus(name)
	}
	return out
}

func connect(name string, tune func(*pgx.ConnConfig)) *pgx.Conn {
	conf, err := pgx.ParseConfig(dsn(name))
	if err != nil {
		panic(err)
	}
	conf.OnNotice = func(conn *pgconn.PgConn, notice *pgconn.Notice) {
		noticesMu.Lock()
		defer noticesMu.Unlock()
		notices[conn] = append(notices[conn], fmt.Sprintf("%s %s %s", notice.Severity, notice.Code, notice.Message))
	}
	if tune != nil {
		tune(conf)
	}
	conn, err := pgx.ConnectConfig(bg, conf)
	if err != nil {
		panic(fmt.Sprintf("connect %s: %v", name, err))
	}
	if err := setContext(bg, conn, name); err != nil {
		panic(err)
	}
	return conn
}

func describeCache(conf *pgx.ConnConfig) {
	conf.BuildStatementCache = func(conn *pgconn.PgConn) stmtcache.Cache {
		return stmtcache.New(conn, stmtcache.ModeDescribe, 512)
	}
}

func noCache(conf *pgx.ConnConfig) { conf.BuildStatementCache = nil }

func simple(conf *pgx.ConnConfig) { conf.PreferSimpleProtocol = true }

// plain turns what pgx decoded into something JSON prints the same way every run.
func plain(value interface{}) interface{} {
	switch v := value.(type) {
	case time.Time:
		return v.Format(time.RFC3339Nano) + " " + v.Location().String()
	case []byte:
		return "\\x" + hex.EncodeToString(v)
	case [16]byte:
		return hex.EncodeToString(v[:])
	case nil, string, bool, int16, int32, int64, float32, float64, map[string]interface{}, []interface{}:
		return v
	default:
		if marshalled, err := json.Marshal(v); err == nil {
			return fmt.Sprintf("%T %s", v, marshalled)
		}
		return fmt.Sprintf("%T %v", v, v)
	}
}

// rowsOf runs a query and returns its field names and OIDs, and its rows as plain values.
func rowsOf(conn *pgx.Conn, sql string, args ...interface{}) (interface{}, error) {
	rows, err := conn.Query(bg, sql, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var seen [][]interface{}
	for rows.Next() {
		values, err := rows.Values()
		if err != nil {
			return seen, err
		}
		row := make([]interface{}, len(values))
		for i, v := range values {
			row[i] = plain(v)
		}
		seen = append(seen, row)
	}
	if err := rows.Err(); err != nil {
		return seen, err
	}
	fields := []string{}
	for _, f := range rows.FieldDescriptions() {
		fields = append(fields, fmt.Sprintf("%s:%d", f.Name, f.DataTypeOID))
	}
	return map[string]interface{}{"fields": fields, "rows": seen, "tag": rows.CommandTag().String()}, nil
}

// each runs queries in turn and keeps each result or error.
func each(conn *pgx.Conn, queries ...[]interface{}) []interface{} {
	seen := []interface{}{}
	for _, q := range queries {
		seen = append(seen, outcome(rowsOf(conn, q[0].(string), q[1:]...)))
	}
	return seen
}

func q(sql string, args ...interface{}) []interface{} { return append([]interface{}{sql}, args...) }

func exec(conn *pgx.Conn, sql string, args ...interface{}) interface{} {
	tag, err := conn.Exec(bg, sql, args...)
	return outcome(tag.String(), err)
}

const typesQuery = `SELECT $1::text AS t, $2::int4 AS i, $3::int8 AS big, $4::float8 AS f, $5::bool AS b,
 $6::timestamptz AS ts, '2024-02-29'::date AS d, '13:14:15.5'::time AS tm, '1 day 02:03:04'::interval AS iv,
 12345678901234567890.5::numeric AS n, $7::numeric::text AS ntext, '{"k": [1, "x"]}'::jsonb AS j, '{"a":1}'::json AS js,
 ARRAY[1, 2, NULL]::int4[] AS arr, ARRAY['x', 'y z']::text[] AS tarr, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u,
 '\x00fffe'::bytea AS by, NULL::text AS nothing, '2024-02-29 12:00:00+00'::timestamptz AS fixed,
 '2024-02-29 12:00:00+00'::timestamptz::text AS fixedtext, current_setting('TimeZone') AS tz`

func typesArgs() []interface{} {
	return []interface{}{"zoë 🚀", int32(7), int64(1) << 40, 2.5, true, time.Date(2024, 2, 29, 12, 0, 0, 0, time.UTC), "1.25"}
}

// failingSource gives three rows, then an error: pgx ends the COPY with CopyFail.
type failingSource struct {
	run, i int
}

func (f *failingSource) Next() bool { f.i++; return true }
func (f *failingSource) Values() ([]interface{}, error) {
	if f.i > 3 {
		return nil, errors.New("the source failed")
	}
	return []interface{}{int32(f.run), int32(4000 + f.i)}, nil
}
func (f *failingSource) Err() error { return nil }

func admin(sql string) {
	conn, err := pgx.Connect(bg, cfg.Admin)
	if err != nil {
		panic(err)
	}
	defer conn.Close(bg)
	if _, err := conn.Exec(bg, sql); err != nil {
		panic(fmt.Sprintf("admin %q: %v", sql, err))
	}
}

// twoTransactionsAtOnce runs three rounds of a transaction on a and one on b at the same time (in transaction
// mode, both server connections at once), each counting the tenant's rows with count, after the outcomes in seen.
func twoTransactionsAtOnce(a, b *pgx.Conn, count string, seen []interface{}) ([]interface{}, error) {
	for round := 0; round < 3; round++ {
		t1, err1 := a.Begin(bg)
		t2, err2 := b.Begin(bg)
		if err1 != nil || err2 != nil {
			return seen, fmt.Errorf("begin: %v %v", err1, err2)
		}
		seen = append(seen, outcome(rowsOf(t1.Conn(), count, "one")), outcome(rowsOf(t2.Conn(), count, "two")), outcome(nil, t1.Commit(bg)), outcome(nil, t2.Commit(bg)))
	}
	return seen, nil
}

func main() {
	if err := json.Unmarshal([]byte(os.Getenv("DRIVER_CONFIG")), &cfg); err != nil {
		panic(err)
	}
	run := cfg.Run
	scratch, shape := "go_pgx_scratch", "go_pgx_shape"
	admin(fmt.Sprintf(`DROP TABLE IF EXISTS %[1]s, %[2]s; CREATE TABLE %[1]s (run int NOT NULL, n int, t text, at timestamptz, j jsonb);
		GRANT SELECT, INSERT, UPDATE, DELETE ON %[1]s TO %[3]s;
		CREATE TABLE %[2]s (id int, name text); INSERT INTO %[2]s VALUES (1, 'one'), (2, 'two');
		GRANT SELECT, INSERT ON %[2]s TO %[3]s`, scratch, shape, cfg.AppRole))
	defer admin(fmt.Sprintf("DROP TABLE IF EXISTS %s, %s", scratch, shape))
	// Three schemas with a table go_pgx_t: two of one shape, one of another.
	admin(fmt.Sprintf(`DROP SCHEMA IF EXISTS go_pgx_s1, go_pgx_s2, go_pgx_s3 CASCADE;
		CREATE SCHEMA go_pgx_s1; CREATE SCHEMA go_pgx_s2; CREATE SCHEMA go_pgx_s3;
		CREATE TABLE go_pgx_s1.go_pgx_t (v text); INSERT INTO go_pgx_s1.go_pgx_t VALUES ('s1');
		CREATE TABLE go_pgx_s2.go_pgx_t (v text); INSERT INTO go_pgx_s2.go_pgx_t VALUES ('s2');
		CREATE TABLE go_pgx_s3.go_pgx_t (v int, w int); INSERT INTO go_pgx_s3.go_pgx_t VALUES (3, 3);
		GRANT USAGE ON SCHEMA go_pgx_s1, go_pgx_s2, go_pgx_s3 TO %[1]s;
		GRANT SELECT ON go_pgx_s1.go_pgx_t, go_pgx_s2.go_pgx_t, go_pgx_s3.go_pgx_t TO %[1]s`, cfg.AppRole))
	defer admin("DROP SCHEMA IF EXISTS go_pgx_s1, go_pgx_s2, go_pgx_s3 CASCADE")

	a := connect("a", nil)
	b := connect("b", nil)
	c := connect("b", nil)

	attempt("ping", func() (interface{}, error) { return "ok", a.Ping(bg) })

	// The default cache: each text prepared once per connection (named), then Bind/Describe/Execute/Sync.
	count := "SELECT count(*)::int AS n, min(tenant_id::text) AS tenant FROM leads WHERE name <> $1"
	attempt("cached count", func() (interface{}, error) { return rowsOf(a, count, "nobody") })
	attempt("cached count again", func() (interface{}, error) { return rowsOf(a, count, "Ada Lovelace") })
	attempt("cached count of b", func() (interface{}, error) { return rowsOf(b, count, "nobody") })
	attempt("cached across transactions", func() (interface{}, error) {
		seen := []interface{}{}
		bt, err := b.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen = append(seen, outcome(rowsOf(a, count, "x")))
		ct, err := c.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen = append(seen, outcome(rowsOf(bt.Conn(), count, "y")), outcome(nil, bt.Commit(bg)))
		seen = append(seen, outcome(rowsOf(a, count, "z")), outcome(rowsOf(ct.Conn(), count, "w")), outcome(nil, ct.Commit(bg)))
		return seen, nil
	})
	attempt("cached types", func() (interface{}, error) { return rowsOf(a, typesQuery, typesArgs()...) })
	attempt("cached errors", func() (interface{}, error) {
		return each(a, q("SELECT $1::int AS v", "not a number"), q("SELECT 1/$1::int AS v", 0), q("SELEC 1"),
			q("SELECT $1::int AS v", 5), q(count, "again")), nil
	})
	attempt("exec with arguments", func() (interface{}, error) {
		return []interface{}{exec(a, "INSERT INTO "+scratch+" (run, n, t) VALUES ($1, $2, $3)", run, 1, "exec"),
			exec(a, "UPDATE "+scratch+" SET t = $1 WHERE run = $2 AND n = $3", "exec2", run, 1),
			exec(a, "SELECT 1"), exec(a, "SELECT 1; SELECT 2")}, nil
	})

	// The describe-only cache: the unnamed statement described once; each query Parse/Bind/Describe/Execute.
	d := connect("a", describeCache)
	attempt("describe cache count", func() (interface{}, error) { return rowsOf(d, count, "nobody") })
	attempt("describe cache again", func() (interface{}, error) { return rowsOf(d, count, "Ada Lovelace") })
	attempt("describe cache types", func() (interface{}, error) { return rowsOf(d, typesQuery, typesArgs()...) })
	attempt("describe cache errors", func() (interface{}, error) {
		return each(d, q("SELECT $1::int AS v", "not a number"), q("SELECT 1/$1::int AS v", 0), q("SELECT $1::int AS v", 5)), nil
	})
	attempt("describe cache while b holds a transaction", func() (interface{}, error) {
		bt, err := b.Begin(bg)
		if err != nil {
			return nil, err
		}
		defer bt.Rollback(bg)
		return []interface{}{outcome(rowsOf(d, count, "q")), outcome(rowsOf(bt.Conn(), count, "r")), outcome(rowsOf(d, "SELECT $1::text AS t", "later"))}, nil
	})

	// No cache: the unnamed statement described with Parse/Describe/Sync, then bound in a group of its own.
	n := connect("b", noCache)
	attempt("no cache count", func() (interface{}, error) { return rowsOf(n, count, "nobody") })
	attempt("no cache types", func() (interface{}, error) { return rowsOf(n, typesQuery, typesArgs()...) })
	attempt("no cache while others hold transactions", func() (interface{}, error) {
		// One transaction held at a time: transaction mode has two server connections.
		at, err := a.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen := []interface{}{outcome(rowsOf(at.Conn(), "SELECT $1::int AS v", 1)), outcome(rowsOf(n, count, "s"))}
		ct, err := c.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen = append(seen, outcome(nil, at.Rollback(bg)), outcome(rowsOf(ct.Conn(), count, "t")), outcome(rowsOf(n, "SELECT $1::int + 1 AS v", 1)),
			exec(n, "INSERT INTO "+scratch+" (run, n, t) VALUES ($1, $2, $3)", run, 2, "nocache"))
		return append(seen, outcome(nil, ct.Rollback(bg))), nil
	})
	attempt("no cache errors", func() (interface{}, error) {
		return each(n, q("SELECT $1::int AS v", "x"), q("SELEC $1"), q("SELECT 1/$1::int AS v", 0), q(count, "after")), nil
	})

	// pgconn's ExecParams: Parse/Bind/Describe portal/Execute/Sync, the statement never described.
	attempt("exec params", func() (interface{}, error) {
		results, err := a.PgConn().ExecParams(bg, "SELECT count(*)::text, $1::text FROM leads WHERE name <> $2",
			[][]byte{[]byte("param"), []byte("nobody")}, nil, nil, nil).Read(), error(nil)
		if results.Err != nil {
			return nil, results.Err
		}
		rows := [][]string{}
		for _, row := range results.Rows {
			rows = append(rows, []string{string(row[0]), string(row[1])})
		}
		return map[string]interface{}{"rows": rows, "tag": results.CommandTag.String()}, err
	})
	attempt("exec params error then ok", func() (interface{}, error) {
		first := a.PgConn().ExecParams(bg, "SELECT 1/$1::int", [][]byte{[]byte("0")}, nil, nil, nil).Read()
		second := a.PgConn().ExecParams(bg, "SELECT $1::int + 1", [][]byte{[]byte("41")}, nil, nil, nil).Read()
		out := []interface{}{}
		for _, r := range []*pgconn.Result{first, second} {
			if r.Err != nil {
				out = append(out, failure(r.Err))
			} else {
				out = append(out, string(r.Rows[0][0]))
			}
		}
		return out, nil
	})
	attempt("exec multi", func() (interface{}, error) {
		results, err := a.PgConn().Exec(bg, "SELECT 1 AS one; SELECT count(*) FROM leads; SELECT tenant_proxy.current_tenant()").ReadAll()
		out := []interface{}{}
		for _, r := range results {
			rows := []string{}
			for _, row := range r.Rows {
				rows = append(rows, string(row[0]))
			}
			out = append(out, []interface{}{r.CommandTag.String(), rows, outcome(nil, r.Err)})
		}
		return out, err
	})

	// The simple protocol: arguments interpolated by pgx.
	s := connect("b", simple)
	attempt("simple count", func() (interface{}, error) { return rowsOf(s, count, "nobody") })
	attempt("simple types", func() (interface{}, error) { return rowsOf(s, typesQuery, typesArgs()...) })
	attempt("simple errors", func() (interface{}, error) {
		return each(s, q("SELECT 1/$1::int AS v", 0), q(count, "after"), q("SELECT $1::int AS v", "x'; SELECT 1")), nil
	})
	attempt("simple per query on a cached connection", func() (interface{}, error) {
		return rowsOf(a, count, pgx.QuerySimpleProtocol(true), "nobody")
	})

	// Transactions and savepoints (pgx's nested transactions).
	attempt("transaction commit", func() (interface{}, error) {
		tx, err := a.Begin(bg)
		if err != nil {
			return nil, err
		}
		if _, err := tx.Exec(bg, "INSERT INTO "+scratch+" (run, n, t) VALUES ($1, $2, $3)", run, 3, "commit"); err != nil {
			return nil, err
		}
		if err := tx.Commit(bg); err != nil {
			return nil, err
		}
		return rowsOf(a, "SELECT n, t FROM "+scratch+" WHERE run = $1 ORDER BY n", run)
	})
	attempt("transaction rollback", func() (interface{}, error) {
		tx, err := a.Begin(bg)
		if err != nil {
			return nil, err
		}
		ins := exec(tx.Conn(), "INSERT INTO "+scratch+" (run, n, t) VALUES ($1, $2, $3)", run, 4, "rollback")
		inside := outcome(rowsOf(tx.Conn(), "SELECT count(*)::int FROM "+scratch+" WHERE run = $1", run))
		rb := outcome(nil, tx.Rollback(bg))
		return []interface{}{ins, inside, rb, outcome(rowsOf(a, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1", run))}, nil
	})
	attempt("savepoints", func() (interface{}, error) {
		tx, err := b.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen := []interface{}{exec(tx.Conn(), "INSERT INTO "+scratch+" (run, n, t) VALUES ($1, 10, 'outer')", run)}
		inner, err := tx.Begin(bg)
		if err != nil {
			return seen, err
		}
		seen = append(seen, exec(inner.Conn(), "INSERT INTO "+scratch+" (run, n, t) VALUES ($1, 11, 'inner rolled back')", run))
		seen = append(seen, outcome(rowsOf(inner.Conn(), "SELECT 1/$1::int", 0)))
		seen = append(seen, outcome(nil, inner.Rollback(bg)))
		inner2, err := tx.Begin(bg)
		if err != nil {
			return seen, err
		}
		seen = append(seen, exec(inner2.Conn(), "INSERT INTO "+scratch+" (run, n, t) VALUES ($1, 12, 'inner kept')", run))
		seen = append(seen, outcome(nil, inner2.Commit(bg)))
		seen = append(seen, outcome(rowsOf(tx.Conn(), "SELECT n, t FROM "+scratch+" WHERE run = $1 AND n >= 10 ORDER BY n", run)))
		seen = append(seen, outcome(rowsOf(tx.Conn(), count, "in the savepoint's transaction")))
		seen = append(seen, outcome(nil, tx.Commit(bg)))
		return append(seen, outcome(rowsOf(b, "SELECT n, t FROM "+scratch+" WHERE run = $1 AND n >= 10 ORDER BY n", run))), nil
	})
	attempt("error inside a transaction", func() (interface{}, error) {
		tx, err := a.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen := each(tx.Conn(), q("SELECT 1/$1::int AS v", 0), q("SELECT $1::int AS v", 5), q(count, "failed"), q("SELECT 'new text in a failed block'"))
		seen = append(seen, exec(tx.Conn(), "SELECT 1"), outcome(nil, tx.Rollback(bg)), outcome(rowsOf(a, count, "after rollback")))
		return seen, nil
	})
	attempt("transaction options", func() (interface{}, error) {
		tx, err := a.BeginTx(bg, pgx.TxOptions{IsoLevel: pgx.Serializable, AccessMode: pgx.ReadOnly, DeferrableMode: pgx.Deferrable})
		if err != nil {
			return nil, err
		}
		seen := []interface{}{outcome(rowsOf(tx.Conn(), "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'), current_setting('transaction_deferrable')")),
			outcome(rowsOf(tx.Conn(), count, "serializable")), exec(tx.Conn(), "INSERT INTO "+scratch+" (run, n) VALUES ($1, 99)", run)}
		return append(seen, outcome(nil, tx.Rollback(bg))), nil
	})
	attempt("begin func", func() (interface{}, error) {
		err := b.BeginFunc(bg, func(tx pgx.Tx) error {
			_, err := tx.Exec(bg, "INSERT INTO "+scratch+" (run, n, t) VALUES ($1, 20, 'func')", run)
			if err != nil {
				return err
			}
			_, err = tx.Exec(bg, "SELECT 1/0")
			return err
		})
		return outcome(rowsOf(b, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n = 20", run)), err
	})

	// Batch: the statements prepared first (one Sync), then all the Binds and Executes in one Sync.
	batchOf := func(conn *pgx.Conn, queries ...[]interface{}) []interface{} {
		batch := &pgx.Batch{}
		for _, query := range queries {
			batch.Queue(query[0].(string), query[1:]...)
		}
		results := conn.SendBatch(bg, batch)
		seen := []interface{}{}
		for _, query := range queries {
			if strings.HasPrefix(query[0].(string), "INSERT") {
				tag, err := results.Exec()
				seen = append(seen, outcome(tag.String(), err))
				continue
			}
			rows, err := results.Query()
			if err != nil {
				seen = append(seen, outcome(nil, err))
				continue
			}
			var got [][]interface{}
			for rows.Next() {
				values, _ := rows.Values()
				for i := range values {
					values[i] = plain(values[i])
				}
				got = append(got, values)
			}
			seen = append(seen, outcome(got, rows.Err()))
		}
		return append(seen, outcome("closed", results.Close()))
	}
	insert := "INSERT INTO " + scratch + " (run, n, t) VALUES ($1, $2, $3)"
	batchQueries := func(base int) [][]interface{} {
		return [][]interface{}{q(count, "batch"), q(insert, run, base, "batch"), q("SELECT $1::int * 2 AS doubled", base),
			q(insert, run, base+1, "batch"), q("SELECT n, t FROM "+scratch+" WHERE run = $1 AND n >= $2 ORDER BY n", run, base),
			q("SELECT tenant_proxy.current_tenant() AS tenant"), q(typesQuery, typesArgs()...)}
	}
	attempt("batch", func() (interface{}, error) { return batchOf(a, batchQueries(30)...), nil })
	attempt("batch describe cache", func() (interface{}, error) { return batchOf(d, batchQueries(40)...), nil })
	attempt("batch no cache", func() (interface{}, error) { return batchOf(n, batchQueries(50)...), nil })
	attempt("batch simple", func() (interface{}, error) { return batchOf(s, batchQueries(60)...), nil })
	attempt("batch with an error", func() (interface{}, error) {
		return []interface{}{batchOf(a, q(insert, run, 70, "before"), q("SELECT 1/$1::int", 0), q(insert, run, 71, "after"), q(count, "skipped")),
			outcome(rowsOf(a, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n >= 70", run))}, nil
	})
	attempt("batch with a parse error", func() (interface{}, error) {
		return []interface{}{batchOf(a, q(count, "first"), q("SELEC $1", 1), q("SELECT $1::int AS later", 2)), outcome(rowsOf(a, count, "after"))}, nil
	})
	attempt("batch inside a transaction", func() (interface{}, error) {
		tx, err := b.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen := batchOf(tx.Conn(), q(insert, run, 80, "tx batch"), q("SELECT 1/$1::int", 0))
		seen = append(seen, outcome(rowsOf(tx.Conn(), count, "failed")), outcome(nil, tx.Rollback(bg)))
		return append(seen, outcome(rowsOf(b, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n = 80", run))), nil
	})
	attempt("batch of transaction statements", func() (interface{}, error) {
		return []interface{}{batchOf(b, q("BEGIN"), q(insert, run, 85, "begun in batch"), q(count, "in batch"), q("COMMIT")),
			outcome(rowsOf(b, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n = 85", run))}, nil
	})

	// CopyFrom: binary COPY FROM STDIN, the columns described first.
	attempt("copy from", func() (interface{}, error) {
		rows := [][]interface{}{}
		for i := 0; i < 500; i++ {
			rows = append(rows, []interface{}{int32(run), int32(1000 + i), fmt.Sprintf("copy %d ü", i), time.Date(2024, 1, 1, 0, 0, i, 0, time.UTC),
				map[string]interface{}{"i": i}})
		}
		copied, err := a.CopyFrom(bg, pgx.Identifier{scratch}, []string{"run", "n", "t", "at", "j"}, pgx.CopyFromRows(rows))
		if err != nil {
			return copied, err
		}
		return []interface{}{copied, outcome(rowsOf(a, "SELECT count(*)::int, sum(n)::int8, max(at)::text FROM "+scratch+" WHERE run = $1 AND n >= 1000", run))}, nil
	})
	attempt("copy from failing", func() (interface{}, error) {
		rows := [][]interface{}{{int32(run), int32(2000)}, {nil, int32(2001)}}
		copied, err := b.CopyFrom(bg, pgx.Identifier{scratch}, []string{"run", "n"}, pgx.CopyFromRows(rows))
		return []interface{}{copied, outcome(nil, err), outcome(rowsOf(b, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n >= 2000", run))}, nil
	})
	attempt("copy from in a transaction", func() (interface{}, error) {
		tx, err := b.Begin(bg)
		if err != nil {
			return nil, err
		}
		copied, err := tx.CopyFrom(bg, pgx.Identifier{scratch}, []string{"run", "n"}, pgx.CopyFromRows([][]interface{}{{int32(run), int32(3000)}}))
		seen := []interface{}{copied, outcome(nil, err), outcome(rowsOf(tx.Conn(), "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n = 3000", run))}
		return append(seen, outcome(nil, tx.Rollback(bg)), outcome(rowsOf(b, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n = 3000", run))), nil
	})
	attempt("copy from a function source with an error", func() (interface{}, error) {
		copied, err := a.CopyFrom(bg, pgx.Identifier{scratch}, []string{"run", "n"}, &failingSource{run: run})
		return []interface{}{copied, outcome(nil, err), outcome(rowsOf(a, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n >= 4000", run))}, nil
	})

	// A cached statement whose result shape changes: Postgres answers 0A000 "cached plan must not change
	// result type"; pgx drops the statement (DEALLOCATE) and prepares it again at the next query.
	shapeQuery := "SELECT * FROM " + shape + " WHERE id > $1 ORDER BY id"
	sa := connect("a", nil)
	sd := connect("b", describeCache)
	sn := connect("a", noCache)
	attempt("shape before", func() (interface{}, error) {
		return []interface{}{outcome(rowsOf(sa, shapeQuery, 0)), outcome(rowsOf(sd, shapeQuery, 0)), outcome(rowsOf(sn, shapeQuery, 0)),
			outcome(rowsOf(a, shapeQuery, 1))}, nil
	})
	admin("ALTER TABLE " + shape + " ADD COLUMN extra text DEFAULT 'new'")
	attempt("shape after add column", func() (interface{}, error) {
		return []interface{}{outcome(rowsOf(sa, shapeQuery, 0)), outcome(rowsOf(sd, shapeQuery, 0)), outcome(rowsOf(sn, shapeQuery, 0)),
			outcome(rowsOf(a, shapeQuery, 1))}, nil
	})
	attempt("shape next query", func() (interface{}, error) {
		return []interface{}{outcome(rowsOf(sa, shapeQuery, 0)), outcome(rowsOf(sd, shapeQuery, 0)), outcome(rowsOf(sn, shapeQuery, 0)),
			outcome(rowsOf(a, shapeQuery, 1))}, nil
	})
	admin("ALTER TABLE " + shape + " ALTER COLUMN name TYPE varchar(20)")
	attempt("shape after type change in a transaction", func() (interface{}, error) {
		tx, err := sa.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen := []interface{}{outcome(rowsOf(tx.Conn(), shapeQuery, 0)), outcome(rowsOf(tx.Conn(), shapeQuery, 0)), outcome(nil, tx.Rollback(bg))}
		return append(seen, outcome(rowsOf(sa, shapeQuery, 0)), outcome(rowsOf(sa, shapeQuery, 0)), outcome(rowsOf(sd, shapeQuery, 0))), nil
	})
	admin("ALTER TABLE " + shape + " DROP COLUMN extra")
	attempt("shape in a batch", func() (interface{}, error) {
		return []interface{}{batchOf(sa, q(shapeQuery, 0), q("SELECT 1 AS one")), batchOf(sa, q(shapeQuery, 0), q("SELECT 1 AS one"))}, nil
	})
	for _, conn := range []*pgx.Conn{sa, sd, sn} {
		conn.Close(bg)
	}

	// Statement management by the application.
	// On connections of their own: pgx's cache does not recover from statements dropped under it.
	attempt("deallocate all", func() (interface{}, error) {
		a := connect("a", nil)
		defer a.Close(bg)
		return []interface{}{outcome(rowsOf(a, count, "before")), exec(a, "DEALLOCATE ALL"), outcome(rowsOf(a, count, "after")),
			outcome(rowsOf(a, "SELECT $1::int AS fresh", 1)), outcome(rowsOf(a, "SELECT $1::int AS fresh", 2))}, nil
	})
	attempt("deallocate all in a transaction", func() (interface{}, error) {
		b := connect("b", nil)
		defer b.Close(bg)
		tx, err := b.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen := []interface{}{outcome(rowsOf(tx.Conn(), count, "x")), exec(tx.Conn(), "DEALLOCATE ALL"), outcome(rowsOf(tx.Conn(), count, "y")),
			outcome(nil, tx.Rollback(bg))}
		return append(seen, outcome(rowsOf(b, count, "z"))), nil
	})
	attempt("discard all", func() (interface{}, error) {
		dc := connect("b", nil)
		defer dc.Close(bg)
		seen := []interface{}{outcome(rowsOf(dc, count, "before")), exec(dc, "SET application_name = 'discarded'"), exec(dc, "DISCARD ALL")}
		afterReset(dc, "b")
		return append(seen, outcome(rowsOf(dc, count, "after")), outcome(rowsOf(dc, "SELECT current_setting('application_name') AS app, $1::int AS v", 1)),
			outcome(rowsOf(dc, count, "again"))), nil
	})
	attempt("discard all with the describe cache", func() (interface{}, error) {
		dc := connect("a", describeCache)
		defer dc.Close(bg)
		seen := []interface{}{outcome(rowsOf(dc, count, "before")), exec(dc, "DISCARD ALL")}
		afterReset(dc, "a")
		return append(seen, outcome(rowsOf(dc, count, "after"))), nil
	})

	// Settings: SET, set_config, SET LOCAL, RESET, statement_timeout.
	attempt("settings", func() (interface{}, error) {
		// nullif: a placeholder another client set on a shared server connection reads '' there, where a
		// fresh session reads NULL (docs/pool-modes.md); never another client's value.
		read := "SELECT nullif(current_setting('myapp.user_id', true), '') AS uid, nullif(current_setting('myapp.role', true), '') AS role, current_setting('DateStyle') AS ds, current_setting('TimeZone') AS tz, current_setting('search_path') AS sp"
		seen := []interface{}{exec(c, "SET myapp.user_id = '42'"), outcome(rowsOf(c, "SELECT set_config('myapp.role', $1, false) AS r", "admin")),
			exec(c, "SET DateStyle = 'SQL, DMY'"), exec(c, "SET TIME ZONE 'Asia/Tokyo'"), outcome(rowsOf(c, read))}
		tx, err := c.Begin(bg)
		if err != nil {
			return seen, err
		}
		seen = append(seen, exec(tx.Conn(), "SET LOCAL myapp.user_id = '7'"), outcome(rowsOf(tx.Conn(), "SELECT set_config('myapp.role', 'local', true)")),
			outcome(rowsOf(tx.Conn(), read)), outcome(nil, tx.Commit(bg)), outcome(rowsOf(c, read)))
		tx, err = c.Begin(bg)
		if err != nil {
			return seen, err
		}
		seen = append(seen, exec(tx.Conn(), "SET myapp.user_id = '8'"), outcome(nil, tx.Rollback(bg)), outcome(rowsOf(c, read)),
			outcome(rowsOf(c, typesQuery, typesArgs()...)), outcome(rowsOf(b, read)))
		seen = append(seen, exec(c, "RESET myapp.user_id"), exec(c, "RESET TIME ZONE"), exec(c, "RESET DateStyle"), outcome(rowsOf(c, read)))
		return seen, nil
	})
	attempt("statement timeout", func() (interface{}, error) {
		return []interface{}{exec(c, "SET statement_timeout = 200"), outcome(rowsOf(c, "SELECT pg_sleep(3)")), outcome(rowsOf(c, count, "after timeout")),
			outcome(rowsOf(b, "SELECT pg_sleep(0.3)::text AS slept")), exec(c, "RESET statement_timeout")}, nil
	})

	// RuntimeParams: application_name, search_path, TimeZone, a custom setting, as startup parameters.
	attempt("runtime params", func() (interface{}, error) {
		rp := connect("a", func(conf *pgx.ConnConfig) {
			conf.RuntimeParams["application_name"] = "go-pgx"
			conf.RuntimeParams["search_path"] = "tenant_proxy, public"
			conf.RuntimeParams["TimeZone"] = "America/New_York"
			conf.RuntimeParams["DateStyle"] = "ISO, MDY"
		})
		defer rp.Close(bg)
		read := "SELECT current_setting('application_name') AS app, current_setting('search_path') AS sp, current_setting('TimeZone') AS tz, '2024-02-29 12:00:00+00'::timestamptz::text AS ts"
		seen := []interface{}{rp.PgConn().ParameterStatus("application_name"), rp.PgConn().ParameterStatus("TimeZone"), outcome(rowsOf(rp, read)),
			outcome(rowsOf(rp, "SELECT current_tenant() IS NOT NULL AS unqualified, count(*)::int FROM leads"))}
		seen = append(seen, exec(rp, "SET search_path = public"), outcome(rowsOf(rp, read)), exec(rp, "RESET search_path"), exec(rp, "RESET ALL"))
		afterReset(rp, "a")
		seen = append(seen, outcome(rowsOf(rp, read)), outcome(rowsOf(rp, typesQuery, typesArgs()...)), rp.PgConn().ParameterStatus("TimeZone"))
		return seen, nil
	})

	// Notices and reported settings.
	attempt("notices", func() (interface{}, error) {
		heard(b)
		seen := []interface{}{exec(b, "DROP TABLE IF EXISTS no_such_table"), heard(b)}
		tx, err := b.Begin(bg)
		if err != nil {
			return seen, err
		}
		seen = append(seen, exec(tx.Conn(), "BEGIN"), heard(b), exec(tx.Conn(), "SET LOCAL application_name = 'local'"), reported(b),
			outcome(nil, tx.Commit(bg)), heard(b), reported(b), exec(b, "COMMIT"), heard(b), exec(b, "ROLLBACK"), heard(b),
			outcome(rowsOf(b, "SELECT $1::text AS t", "x")), heard(b))
		return seen, nil
	})
	attempt("reported settings", func() (interface{}, error) {
		rc := connect("a", nil)
		defer rc.Close(bg)
		seen := []interface{}{reported(rc), exec(rc, "SET application_name = 'go-set'"), exec(rc, "SET TIME ZONE 'Europe/Paris'"),
			exec(rc, "SET IntervalStyle = 'iso_8601'"), reported(rc)}
		tx, err := rc.Begin(bg)
		if err != nil {
			return seen, err
		}
		seen = append(seen, exec(tx.Conn(), "SET application_name = 'in-tx'"), exec(tx.Conn(), "SET DateStyle = 'German'"), reported(rc),
			outcome(nil, tx.Rollback(bg)), reported(rc), outcome(rowsOf(rc, "SELECT current_setting('application_name'), current_setting('DateStyle')")))
		seen = append(seen, outcome(rowsOf(rc, "SELECT set_config('application_name', $1, false)", "via-set-config")), reported(rc),
			exec(rc, "RESET ALL"))
		afterReset(rc, "a")
		seen = append(seen, reported(rc), exec(rc, "SET application_name = 'again'"), exec(rc, "DISCARD ALL"))
		afterReset(rc, "a")
		seen = append(seen, reported(rc), outcome(rowsOf(rc, "SELECT current_setting('application_name'), current_setting('TimeZone')")), heard(rc))
		return seen, nil
	})

	// The statement cache beyond its capacity: pgx sends DEALLOCATE for the oldest, in and out of
	// transactions, in a failed one too.
	attempt("small statement cache", func() (interface{}, error) {
		sc := connect("b", func(conf *pgx.ConnConfig) {
			conf.BuildStatementCache = func(conn *pgconn.PgConn) stmtcache.Cache { return stmtcache.New(conn, stmtcache.ModePrepare, 2) }
		})
		defer sc.Close(bg)
		seen := []interface{}{}
		for i := 0; i < 4; i++ {
			seen = append(seen, outcome(rowsOf(sc, fmt.Sprintf("SELECT $1::int + %d AS v", i), 1)))
		}
		tx, err := sc.Begin(bg)
		if err != nil {
			return seen, err
		}
		seen = append(seen, outcome(rowsOf(tx.Conn(), "SELECT $1::int + 0 AS v", 2)), outcome(rowsOf(tx.Conn(), "SELECT 1/$1::int", 0)),
			outcome(rowsOf(tx.Conn(), "SELECT $1::int + 9 AS v", 2)), outcome(rowsOf(tx.Conn(), "SELECT $1::int + 3 AS v", 2)), outcome(nil, tx.Rollback(bg)))
		for i := 0; i < 4; i++ {
			seen = append(seen, outcome(rowsOf(sc, fmt.Sprintf("SELECT $1::int + %d AS v", i), 3)))
		}
		return seen, nil
	})
	attempt("many statements", func() (interface{}, error) {
		mc := connect("a", nil)
		defer mc.Close(bg)
		sum := 0
		for i := 0; i < 260; i++ {
			var v int
			if err := mc.QueryRow(bg, fmt.Sprintf("SELECT $1::int + %d", i), 1).Scan(&v); err != nil {
				return []interface{}{i, failure(err)}, nil
			}
			sum += v
		}
		var v int
		err := mc.QueryRow(bg, "SELECT $1::int + 0", 5).Scan(&v)
		return []interface{}{sum, outcome(v, err)}, nil
	})
	attempt("explicit prepare and deallocate", func() (interface{}, error) {
		pc := connect("b", nil)
		defer pc.Close(bg)
		seen := []interface{}{}
		sd, err := pc.Prepare(bg, "mine", "SELECT $1::int * 2 AS v, $2::text AS t")
		if err != nil {
			return seen, err
		}
		seen = append(seen, sd.Name, len(sd.ParamOIDs), outcome(rowsOf(pc, "mine", 4, "x")), outcome(rowsOf(pc, "mine", "y", "x")))
		_, err = pc.Prepare(bg, "mine", "SELECT $1::int * 2 AS v, $2::text AS t")
		seen = append(seen, outcome(nil, err))
		_, err = pc.PgConn().Prepare(bg, "mine", "SELECT 3", nil)
		seen = append(seen, outcome(nil, err), outcome(nil, pc.Deallocate(bg, "mine")), outcome(rowsOf(pc, "SELECT $1::int AS v", 1)))
		_, err = pc.PgConn().Prepare(bg, "mine", "SELECT 3 AS three", nil)
		seen = append(seen, outcome(nil, err), outcome(nil, pc.Deallocate(bg, "mine")), outcome(nil, pc.Deallocate(bg, "mine")))
		tx, err := pc.Begin(bg)
		if err != nil {
			return seen, err
		}
		_, err = tx.Prepare(bg, "in_tx", "SELECT 1/$1::int AS v")
		seen = append(seen, outcome(nil, err), outcome(rowsOf(tx.Conn(), "in_tx", 0)), outcome(nil, pc.Deallocate(bg, "in_tx")), outcome(nil, tx.Rollback(bg)),
			outcome(nil, pc.Deallocate(bg, "in_tx")))
		return seen, nil
	})
	attempt("batch with statement management", func() (interface{}, error) {
		bm := connect("a", nil)
		defer bm.Close(bg)
		seen := []interface{}{outcome(rowsOf(bm, count, "cached")), batchOf(bm, q("DEALLOCATE ALL"), q(count, "after deallocate in batch")),
			outcome(rowsOf(bm, count, "after the batch")), batchOf(bm, q("DISCARD ALL")), batchOf(bm, q("SELECT 1 AS one"), q("DISCARD ALL"))}
		afterReset(bm, "a")
		return append(seen, outcome(rowsOf(bm, "SELECT $1::int AS v", 1)), heard(bm)), nil
	})
	attempt("large batch", func() (interface{}, error) {
		batch := &pgx.Batch{}
		for i := 0; i < 3000; i++ {
			batch.Queue("SELECT $1::int AS i, $2::text AS t", i, strings.Repeat("y", i%50))
		}
		results := b.SendBatch(bg, batch)
		sum := 0
		for i := 0; i < 3000; i++ {
			var v int
			var t string
			if err := results.QueryRow().Scan(&v, &t); err != nil {
				results.Close()
				return []interface{}{i, failure(err)}, nil
			}
			sum += v + len(t)
		}
		return []interface{}{sum, outcome(nil, results.Close()), outcome(rowsOf(b, count, "after"))}, nil
	})
	attempt("large copy failing early", func() (interface{}, error) {
		rows := make([][]interface{}, 0, 200000)
		rows = append(rows, []interface{}{nil, int32(0), "null run"})
		for i := 1; i < 200000; i++ {
			rows = append(rows, []interface{}{int32(run), int32(5000000 + i), strings.Repeat("z", 20)})
		}
		copied, err := a.CopyFrom(bg, pgx.Identifier{scratch}, []string{"run", "n", "t"}, pgx.CopyFromRows(rows))
		return []interface{}{copied, outcome(nil, err), outcome(rowsOf(a, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n >= 5000000", run)),
			outcome(nil, a.Ping(bg))}, nil
	})
	attempt("large copy", func() (interface{}, error) {
		rows := make([][]interface{}, 0, 100000)
		for i := 0; i < 100000; i++ {
			rows = append(rows, []interface{}{int32(run), int32(6000000 + i), strings.Repeat("w", 30)})
		}
		copied, err := b.CopyFrom(bg, pgx.Identifier{scratch}, []string{"run", "n", "t"}, pgx.CopyFromRows(rows))
		return []interface{}{copied, outcome(nil, err), outcome(rowsOf(b, "SELECT count(*)::int, sum(n)::int8 FROM "+scratch+" WHERE run = $1 AND n >= 6000000", run))}, nil
	})

	// Statements that refuse transaction blocks, alone and in batches (VACUUM of a table the role does not
	// own: a WARNING, then done), and COPY TO STDOUT.
	attempt("vacuum", func() (interface{}, error) {
		heard(c)
		vacuum := "VACUUM " + scratch
		seen := []interface{}{exec(c, vacuum), heard(c), batchOf(c, q(vacuum)), heard(c), batchOf(c, q(vacuum), q(count, "behind vacuum")), heard(c),
			batchOf(c, q(count, "before vacuum"), q(vacuum)), heard(c), exec(c, vacuum+"; SELECT 1"), heard(c)}
		tx, err := c.Begin(bg)
		if err != nil {
			return seen, err
		}
		return append(seen, exec(tx.Conn(), vacuum), outcome(nil, tx.Rollback(bg)), outcome(rowsOf(c, count, "after")), heard(c)), nil
	})
	attempt("copy to", func() (interface{}, error) {
		var out strings.Builder
		tag, err := b.PgConn().CopyTo(bg, &out, fmt.Sprintf("COPY (SELECT n, t FROM %s WHERE run = %d AND n < 100 ORDER BY n) TO STDOUT", scratch, run))
		return []interface{}{tag.String(), out.String(), outcome(rowsOf(b, count, "after copy to"))}, err
	})
	attempt("sslmode prefer", func() (interface{}, error) {
		conf, err := pgx.ParseConfig(strings.Replace(dsn("a"), "sslmode=disable", "sslmode=prefer", 1))
		if err != nil {
			return nil, err
		}
		pc, err := pgx.ConnectConfig(bg, conf)
		if err != nil {
			return nil, err
		}
		defer pc.Close(bg)
		if err := setContext(bg, pc, "a"); err != nil {
			return nil, err
		}
		return rowsOf(pc, count, "prefer")
	})
	// A query whose context ends while it waits for a lock another transaction holds (and, in transaction
	// mode with two server connections, one whose context ends while it waits for a connection): pgx closes
	// its connection; afterwards two transactions at once still get their connections.
	attempt("context ends while waiting", func() (interface{}, error) {
		holder, err := a.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen := []interface{}{outcome(rowsOf(holder.Conn(), "SELECT pg_advisory_xact_lock($1)::text", run+3))}
		waiter := connect("b", nil)
		ctx, cancel := context.WithTimeout(bg, 300*time.Millisecond)
		_, err = waiter.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", run+3)
		cancel()
		seen = append(seen, outcome(nil, err), waiter.IsClosed())
		<-waiter.PgConn().CleanupDone()
		seen = append(seen, outcome(nil, holder.Rollback(bg)))
		return twoTransactionsAtOnce(a, b, count, seen)
	})

	// A query whose context ends while it waits (directly for a lock; in transaction mode with both server
	// connections held, first for a server connection).
	attempt("context ends while both connections are held", func() (interface{}, error) {
		holder, err := a.Begin(bg)
		if err != nil {
			return nil, err
		}
		other, err := c.Begin(bg)
		if err != nil {
			return nil, err
		}
		seen := []interface{}{outcome(rowsOf(holder.Conn(), "SELECT pg_advisory_xact_lock($1)::text", run+4)), outcome(rowsOf(other.Conn(), "SELECT 1 AS one"))}
		waiter := connect("b", nil)
		ctx, cancel := context.WithTimeout(bg, 300*time.Millisecond)
		_, err = waiter.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", run+4)
		cancel()
		seen = append(seen, outcome(nil, err), waiter.IsClosed())
		<-waiter.PgConn().CleanupDone()
		seen = append(seen, outcome(nil, holder.Rollback(bg)), outcome(nil, other.Rollback(bg)))
		return twoTransactionsAtOnce(a, b, count, seen)
	})

	// A cached statement and search_path: Postgres parses a prepared statement again when search_path
	// changed since its last use, with the new path (a table of another shape: 0A000).
	attempt("search_path under a cached statement", func() (interface{}, error) {
		sp := connect("a", nil)
		defer sp.Close(bg)
		other := connect("a", nil)
		defer other.Close(bg)
		read := "SELECT * FROM go_pgx_t WHERE $1::int > 0"
		seen := []interface{}{exec(sp, "SET search_path = go_pgx_s1, public"), outcome(rowsOf(sp, read, 1)), exec(sp, "SET search_path = go_pgx_s2, public"),
			outcome(rowsOf(sp, read, 1)), outcome(rowsOf(sp, "SELECT current_setting('search_path')")), exec(sp, "SET search_path = go_pgx_s3, public"),
			outcome(rowsOf(sp, read, 1)), outcome(rowsOf(sp, read, 1))}
		// Another connection of the same tenant prepares the same text under another path in between.
		seen = append(seen, exec(other, "SET search_path = go_pgx_s1, public"), outcome(rowsOf(other, read, 1)), outcome(rowsOf(sp, read, 1)))
		tx, err := sp.Begin(bg)
		if err != nil {
			return seen, err
		}
		seen = append(seen, exec(tx.Conn(), "SET LOCAL search_path = go_pgx_s2, public"), outcome(rowsOf(tx.Conn(), read, 1)), outcome(nil, tx.Commit(bg)),
			outcome(rowsOf(sp, read, 1)), outcome(rowsOf(other, read, 1)))
		return seen, nil
	})

	// Statement names pgx's Deallocate quotes: mixed case, a space and a double quote, longer than 63 bytes.
	attempt("statement names", func() (interface{}, error) {
		nc := connect("b", nil)
		defer nc.Close(bg)
		heard(nc)
		seen := []interface{}{}
		long := strings.Repeat("long_name_", 8)
		for _, name := range []string{"MixedCase", "mixedcase", "with space", `with"quote`, long, long[:63] + "zzz", "ü_" + strings.Repeat("é", 40)} {
			_, err := nc.Prepare(bg, name, "SELECT $1::text || '"+strings.ReplaceAll(name, "'", "''")+"' AS v")
			seen = append(seen, name, outcome(nil, err), outcome(rowsOf(nc, name, "x")), heard(nc))
		}
		for _, name := range []string{"MixedCase", "with space", `with"quote`, long, "ü_" + strings.Repeat("é", 40)} {
			seen = append(seen, outcome(nil, nc.Deallocate(bg, name)), heard(nc), outcome(rowsOf(nc, "mixedcase", "y")))
			_, err := nc.PgConn().Prepare(bg, name, "SELECT 2 AS again", nil)
			seen = append(seen, outcome(nil, err))
		}
		seen = append(seen, exec(nc, "DEALLOCATE mixedcase"), exec(nc, "DEALLOCATE MIXEDCASE"), exec(nc, `DEALLOCATE PREPARE "MixedCase"`), heard(nc))
		return seen, nil
	})

	// Cancellation: PgConn.CancelRequest while rows arrive (57014, the connection goes on), and a context
	// cancelled while rows arrive (pgx closes the connection and sends a CancelRequest: the server's
	// statement ends, releasing its transaction-level advisory lock, which another connection then takes).
	long := "SELECT CASE WHEN g < 400 THEN repeat('x', 100) ELSE pg_sleep(30)::text END AS v FROM generate_series(1, 500) AS g, (SELECT pg_advisory_xact_lock($1)) AS l"
	drain := func(rows pgx.Rows, onFirst func()) (int, error) {
		got := 0
		for rows.Next() {
			if got == 0 {
				onFirst()
			}
			got++
		}
		rows.Close()
		return got, rows.Err()
	}
	lockTaken := func(conn *pgx.Conn, key int) interface{} {
		deadline := time.Now().Add(15 * time.Second)
		for time.Now().Before(deadline) {
			var taken bool
			if err := conn.QueryRow(bg, "SELECT pg_try_advisory_xact_lock($1)", key).Scan(&taken); err != nil {
				return failure(err)
			}
			if taken {
				return "released"
			}
			time.Sleep(20 * time.Millisecond)
		}
		return "still held"
	}
	attempt("cancel request", func() (interface{}, error) {
		rows, err := a.Query(bg, long, run)
		if err != nil {
			return nil, err
		}
		got, err := drain(rows, func() {
			if err := a.PgConn().CancelRequest(bg); err != nil {
				panic(err)
			}
		})
		return []interface{}{got >= 1 && got < 400, outcome(nil, err), lockTaken(b, run), outcome(rowsOf(a, count, "after cancel")), a.IsClosed()}, nil
	})
	attempt("cancel request in a transaction", func() (interface{}, error) {
		tx, err := a.Begin(bg)
		if err != nil {
			return nil, err
		}
		rows, err := tx.Query(bg, long, run+1)
		if err != nil {
			return nil, err
		}
		got, err := drain(rows, func() {
			if err := a.PgConn().CancelRequest(bg); err != nil {
				panic(err)
			}
		})
		seen := []interface{}{got >= 1 && got < 400, outcome(nil, err), outcome(rowsOf(tx.Conn(), "SELECT 1")), outcome(nil, tx.Rollback(bg))}
		return append(seen, lockTaken(b, run+1), outcome(rowsOf(a, count, "after"))), nil
	})
	attempt("context cancelled", func() (interface{}, error) {
		victim := connect("b", nil)
		ctx, cancel := context.WithCancel(bg)
		defer cancel()
		rows, err := victim.Query(ctx, long, run+2)
		if err != nil {
			return nil, err
		}
		got, err := drain(rows, cancel)
		seen := []interface{}{got >= 1 && got < 400, outcome(nil, err), victim.IsClosed(), lockTaken(a, run+2)}
		<-victim.PgConn().CleanupDone()
		return append(seen, outcome(rowsOf(b, count, "another connection"))), nil
	})
	attempt("context deadline before the query", func() (interface{}, error) {
		ctx, cancel := context.WithCancel(bg)
		cancel()
		_, err := c.Exec(ctx, "SELECT 1")
		return []interface{}{outcome(nil, err), c.IsClosed(), outcome(rowsOf(c, count, "after"))}, nil
	})
	attempt("ping after errors", func() (interface{}, error) {
		return []interface{}{outcome(nil, a.Ping(bg)), outcome(nil, b.Ping(bg)), outcome(nil, c.Ping(bg)), outcome(nil, d.Ping(bg)), outcome(nil, n.Ping(bg)), outcome(nil, s.Ping(bg))}, nil
	})

	// pgxpool: more goroutines than connections, two tenants at once.
	attempt("pools", func() (interface{}, error) {
		pools := map[string]*pgxpool.Pool{}
		for _, name := range []string{"a", "b"} {
			name := name
			conf, err := pgxpool.ParseConfig(dsn(name) + " pool_max_conns=3")
			if err != nil {
				return nil, err
			}
			conf.AfterConnect = func(ctx context.Context, conn *pgx.Conn) error { return setContext(ctx, conn, name) }
			pool, err := pgxpool.ConnectConfig(bg, conf)
			if err != nil {
				return nil, err
			}
			defer pool.Close()
			pools[name] = pool
		}
		type result struct {
			key   string
			value interface{}
		}
		var mu sync.Mutex
		var results []result
		var wg sync.WaitGroup
		for _, name := range []string{"a", "b"} {
			for g := 0; g < 10; g++ {
				wg.Add(1)
				go func(name string, g int) {
					defer wg.Done()
					pool := pools[name]
					seen := []interface{}{}
					for i := 0; i < 5; i++ {
						var tenant string
						var n int
						err := pool.QueryRow(bg, "SELECT min(tenant_id::text), count(*)::int + $1 FROM leads", i).Scan(&tenant, &n)
						seen = append(seen, outcome([]interface{}{tenant, n}, err))
					}
					err := pool.BeginFunc(bg, func(tx pgx.Tx) error {
						if _, err := tx.Exec(bg, insert, run, 10000+g, "pool "+name); err != nil {
							return err
						}
						var n int
						err := tx.QueryRow(bg, "SELECT count(*)::int FROM leads WHERE name <> $1", "x").Scan(&n)
						seen = append(seen, n)
						return err
					})
					seen = append(seen, outcome(nil, err))
					batch := &pgx.Batch{}
					batch.Queue("SELECT $1::int AS g", g)
					batch.Queue(count, "pooled batch")
					br := pool.SendBatch(bg, batch)
					var v, cnt int
					var tenant string
					e1 := br.QueryRow().Scan(&v)
					e2 := br.QueryRow().Scan(&cnt, &tenant)
					seen = append(seen, outcome(v, e1), outcome([]interface{}{cnt, tenant}, e2), outcome(nil, br.Close()))
					if g%3 == 0 {
						_, err := pool.Exec(bg, "SELECT 1/$1::int", 0)
						seen = append(seen, outcome(nil, err))
					}
					mu.Lock()
					results = append(results, result{fmt.Sprintf("%s%02d", name, g), seen})
					mu.Unlock()
				}(name, g)
			}
		}
		wg.Wait()
		sort.Slice(results, func(i, j int) bool { return results[i].key < results[j].key })
		out := map[string]interface{}{}
		for _, r := range results {
			out[r.key] = r.value
		}
		var written int
		err := pools["a"].QueryRow(bg, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n >= 10000", run).Scan(&written)
		out["written"] = outcome(written, err)
		return out, nil
	})

	attempt("listen", func() (interface{}, error) {
		_, err := b.Exec(bg, "LISTEN go_pgx_channel")
		return outcome(b.Ping(bg), nil), err
	})
	attempt("cleanup", func() (interface{}, error) {
		tag, err := a.Exec(bg, "DELETE FROM "+scratch+" WHERE run = $1", run)
		return tag.String(), err
	})
	for _, conn := range []*pgx.Conn{a, b, c, d, n, s} {
		conn.Close(bg)
	}
}
