// lib/pq (github.com/lib/pq, Debian's golang-github-lib-pq-dev) through database/sql as Go applications
// use it: a query or Exec with parameters is the unnamed statement parsed and described in one Sync
// group, then bound and executed in a second one (with binary_parameters=yes, both in one group);
// without parameters a simple Query; db.Prepare is a named statement ("1", "2", ...) prepared on each
// pooled connection that runs it; pq.CopyIn is COPY FROM STDIN with CopyData per Exec; transactions with
// options; a cancelled context (lib/pq sends a CancelRequest and keeps the connection); startup
// parameters from the DSN; LISTEN; and database/sql pools with more goroutines than connections for two
// tenants at once.
//
// DRIVER_CONFIG (JSON) as for go_pgx.go: {host, port, database, run, clients, context, admin, app_role}.
// Prints one JSON object per step.
package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"database/sql/driver"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/lib/pq"
)

func failure(err error) map[string]interface{} {
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		return map[string]interface{}{"code": string(pqErr.Code), "severity": pqErr.Severity, "message": pqErr.Message, "detail": pqErr.Detail,
			"hint": pqErr.Hint, "position": pqErr.Position, "internal_position": pqErr.InternalPosition, "internal_query": pqErr.InternalQuery,
			"where": pqErr.Where, "schema": pqErr.Schema, "table": pqErr.Table, "column": pqErr.Column, "data_type": pqErr.DataTypeName,
			"constraint": pqErr.Constraint, "routine": pqErr.Routine}
	}
	switch {
	case errors.Is(err, context.Canceled):
		return map[string]interface{}{"context": "canceled"}
	case errors.Is(err, context.DeadlineExceeded):
		return map[string]interface{}{"context": "deadline exceeded"}
	}
	return map[string]interface{}{"other": err.Error()}
}

func dsn(name string, extra string) string {
	c := cfg.Clients[name]
	return fmt.Sprintf("host=%s port=%d dbname=%s user=%s password='%s' sslmode=disable %s", cfg.Host, cfg.Port, cfg.Database,
		c.User, strings.ReplaceAll(c.Password, "'", "\\'"), extra)
}

// tenantConnector sets the signed tenant context on each new connection of a direct run, as the proxy
// would, with simple Queries (no statement of its own).
type tenantConnector struct {
	base driver.Connector
	name string
}

func (t tenantConnector) Driver() driver.Driver { return t.base.Driver() }

func (t tenantConnector) Connect(ctx context.Context) (driver.Conn, error) {
	conn, err := t.base.Connect(ctx)
	if err != nil || cfg.Context == nil {
		return conn, err
	}
	rows, err := conn.(driver.QueryerContext).QueryContext(ctx, "SELECT pg_backend_pid()", nil)
	if err != nil {
		return nil, err
	}
	dest := make([]driver.Value, 1)
	if err := rows.Next(dest); err != nil {
		return nil, err
	}
	rows.Close()
	tenant := cfg.Context.Tenants[t.name]
	expires := time.Now().Unix() + 3600
	mac := hmac.New(sha256.New, []byte(cfg.Context.Key))
	fmt.Fprintf(mac, "%d:%d:%s", dest[0].(int64), expires, tenant)
	proof := fmt.Sprintf("%d:%s", expires, hex.EncodeToString(mac.Sum(nil)))
	_, err = conn.(driver.ExecerContext).ExecContext(ctx,
		fmt.Sprintf("SELECT set_config('app.current_tenant', '%s', false), set_config('tenant_proxy.proof', '%s', false)", tenant, proof), nil)
	return conn, err
}

func open(name string, extra string, maxConns int) *sql.DB {
	base, err := pq.NewConnector(dsn(name, extra))
	if err != nil {
		panic(err)
	}
	db := sql.OpenDB(tenantConnector{base, name})
	db.SetMaxOpenConns(maxConns)
	db.SetMaxIdleConns(maxConns)
	return db
}

type querier interface {
	QueryContext(ctx context.Context, query string, args ...interface{}) (*sql.Rows, error)
}

// cancelAtFirstRow runs a statement of 500 rows, the last 100 sleeping 30 s each, on q under ctx, and
// cancels ctx at its first row: whether some but not all of the first 400 rows came, and how it ended.
func cancelAtFirstRow(ctx context.Context, cancel context.CancelFunc, q querier) (bool, error) {
	rows, err := q.QueryContext(ctx, "SELECT CASE WHEN g < 400 THEN repeat('x', 100) ELSE pg_sleep(30)::text END AS v FROM generate_series(1, 500) AS g")
	if err != nil {
		return false, err
	}
	got := 0
	for rows.Next() {
		if got == 0 {
			cancel()
		}
		got++
	}
	err = rows.Err()
	rows.Close()
	return got >= 1 && got < 400, err
}

func plain(value interface{}) interface{} {
	switch v := value.(type) {
	case time.Time:
		return v.Format(time.RFC3339Nano) + " " + v.Location().String()
	case []byte:
		return string(v)
	default:
		return v
	}
}

func rowsOf(db querier, query string, args ...interface{}) (interface{}, error) {
	rows, err := db.QueryContext(bg, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	results := []interface{}{}
	for {
		columns, err := rows.Columns()
		if err != nil {
			return results, err
		}
		types, _ := rows.ColumnTypes()
		fields := []string{}
		for _, t := range types {
			fields = append(fields, t.Name()+":"+t.DatabaseTypeName())
		}
		var seen [][]interface{}
		for rows.Next() {
			values := make([]interface{}, len(columns))
			pointers := make([]interface{}, len(columns))
			for i := range values {
				pointers[i] = &values[i]
			}
			if err := rows.Scan(pointers...); err != nil {
				return results, err
			}
			for i := range values {
				values[i] = plain(values[i])
			}
			seen = append(seen, values)
		}
		if err := rows.Err(); err != nil {
			return append(results, map[string]interface{}{"fields": fields, "rows": seen}), err
		}
		results = append(results, map[string]interface{}{"fields": fields, "rows": seen})
		if !rows.NextResultSet() {
			break
		}
	}
	if len(results) == 1 {
		return results[0], nil
	}
	return results, nil
}

type execer interface {
	ExecContext(ctx context.Context, query string, args ...interface{}) (sql.Result, error)
}

func exec(db execer, query string, args ...interface{}) interface{} {
	result, err := db.ExecContext(bg, query, args...)
	if err != nil {
		return outcome(nil, err)
	}
	affected, err := result.RowsAffected()
	return outcome(affected, err)
}

func admin(query string) {
	db, err := sql.Open("postgres", cfg.Admin+" sslmode=disable")
	if err != nil {
		panic(err)
	}
	defer db.Close()
	if _, err := db.Exec(query); err != nil {
		panic(fmt.Sprintf("admin %q: %v", query, err))
	}
}

const typesQuery = `SELECT $1::text AS t, $2::int4 AS i, $3::int8 AS big, $4::float8 AS f, $5::bool AS b,
 $6::timestamptz AS ts, '2024-02-29'::date AS d, '13:14:15.5'::time AS tm, '1 day 02:03:04'::interval AS iv,
 12345678901234567890.5::numeric AS n, $7::numeric AS pn, '{"k": [1, "x"]}'::jsonb AS j, $8::json AS js,
 $9::int4[] AS arr, ARRAY['x', 'y z']::text[] AS tarr, $10::uuid AS u, $11::bytea AS by, NULL::text AS nothing,
 '2024-02-29 12:00:00+00'::timestamptz AS fixed, current_setting('TimeZone') AS tz`

func typesArgs() []interface{} {
	return []interface{}{"zoë 🚀", 7, int64(1) << 40, 2.5, true, time.Date(2024, 2, 29, 12, 0, 0, 0, time.UTC), "1.25",
		`{"a": 1}`, pq.Array([]int64{1, 2, 3}), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", []byte{0, 1, 254}}
}

func main() {
	if err := json.Unmarshal([]byte(os.Getenv("DRIVER_CONFIG")), &cfg); err != nil {
		panic(err)
	}
	run := cfg.Run
	scratch, shape := "go_pq_scratch", "go_pq_shape"
	admin(fmt.Sprintf(`DROP TABLE IF EXISTS %[1]s, %[2]s; CREATE TABLE %[1]s (run int NOT NULL, n int, t text);
		GRANT SELECT, INSERT, UPDATE, DELETE ON %[1]s TO %[3]s;
		CREATE TABLE %[2]s (id int, name text); INSERT INTO %[2]s VALUES (1, 'one'), (2, 'two');
		GRANT SELECT ON %[2]s TO %[3]s`, scratch, shape, cfg.AppRole))
	defer admin(fmt.Sprintf("DROP TABLE IF EXISTS %s, %s", scratch, shape))
	insert := "INSERT INTO " + scratch + " (run, n, t) VALUES ($1, $2, $3)"
	count := "SELECT count(*)::int AS n, min(tenant_id::text) AS tenant FROM leads WHERE name <> $1"

	a := open("a", "", 1)
	b := open("b", "", 1)
	c := open("b", "", 1)
	defer a.Close()
	defer b.Close()
	defer c.Close()

	attempt("ping", func() (interface{}, error) { return "ok", a.Ping() })
	attempt("query with parameters", func() (interface{}, error) { return rowsOf(a, count, "nobody") })
	attempt("query of b", func() (interface{}, error) { return rowsOf(b, count, "nobody") })
	attempt("types", func() (interface{}, error) { return rowsOf(a, typesQuery, typesArgs()...) })
	attempt("query without parameters", func() (interface{}, error) {
		return rowsOf(b, "SELECT 1 AS one; SELECT count(*)::int AS n FROM leads; SELECT tenant_proxy.current_tenant() AS tenant")
	})
	attempt("exec", func() (interface{}, error) {
		return []interface{}{exec(a, insert, run, 1, "exec"), exec(a, "UPDATE "+scratch+" SET t = $1 WHERE run = $2", "exec2", run),
			exec(a, "SELECT 1"), exec(a, "SELECT 1; SELECT 2"), outcome(rowsOf(a, "SELECT n, t FROM "+scratch+" WHERE run = $1", run))}, nil
	})
	attempt("errors", func() (interface{}, error) {
		return []interface{}{outcome(rowsOf(a, "SELECT $1::int AS v", "not a number")), outcome(rowsOf(a, "SELEC $1", 1)),
			outcome(rowsOf(a, "SELECT 1/$1::int AS v", 0)), exec(a, "SELECT 1/$1::int", 0), exec(a, "SELEC 1"),
			outcome(rowsOf(a, "SELECT 1/0; SELECT 2")), outcome(rowsOf(a, count, "after"))}, nil
	})

	// The unnamed statement across two Sync groups while other clients hold transactions: in transaction
	// mode its Bind may land on another server connection than its Parse.
	attempt("unnamed across transactions", func() (interface{}, error) {
		seen := []interface{}{}
		bt, err := b.Begin()
		if err != nil {
			return nil, err
		}
		seen = append(seen, exec(bt, insert, run, 2, "b's transaction"), outcome(rowsOf(a, count, "while b")))
		ct, err := c.Begin()
		if err != nil {
			return nil, err
		}
		seen = append(seen, outcome(nil, bt.Commit()), outcome(rowsOf(ct, count, "c")), outcome(rowsOf(a, "SELECT $1::int + 1 AS v", 1)))
		seen = append(seen, outcome(nil, ct.Rollback()), outcome(rowsOf(c, count, "after")))
		return seen, nil
	})

	// database/sql's prepared statement: named, prepared on each pooled connection that runs it.
	attempt("prepared", func() (interface{}, error) {
		stmt, err := a.Prepare("SELECT count(*)::int + $1::int AS n FROM leads")
		if err != nil {
			return nil, err
		}
		defer stmt.Close()
		seen := []interface{}{}
		for i := 0; i < 3; i++ {
			var n int
			err := stmt.QueryRow(i).Scan(&n)
			seen = append(seen, outcome(n, err))
		}
		var n int
		err = stmt.QueryRow("x").Scan(&n)
		seen = append(seen, outcome(nil, err))
		tx, err := a.Begin()
		if err != nil {
			return seen, err
		}
		err = tx.Stmt(stmt).QueryRow(10).Scan(&n)
		seen = append(seen, outcome(n, err), outcome(nil, tx.Commit()))
		return seen, nil
	})
	attempt("prepared with a parse error", func() (interface{}, error) {
		_, err := a.Prepare("SELEC $1")
		return outcome(rowsOf(a, count, "after")), err
	})
	attempt("prepared statements closed and prepared again", func() (interface{}, error) {
		seen := []interface{}{}
		for i := 0; i < 3; i++ {
			stmt, err := b.Prepare(fmt.Sprintf("SELECT $1::int * %d AS v", i+1))
			if err != nil {
				return seen, err
			}
			var v int
			err = stmt.QueryRow(7).Scan(&v)
			seen = append(seen, outcome(v, err), outcome(nil, stmt.Close()))
		}
		return seen, nil
	})

	// Transactions.
	attempt("transaction commit and rollback", func() (interface{}, error) {
		tx, err := a.Begin()
		if err != nil {
			return nil, err
		}
		seen := []interface{}{exec(tx, insert, run, 3, "commit"), outcome(nil, tx.Commit())}
		tx, err = a.Begin()
		if err != nil {
			return seen, err
		}
		seen = append(seen, exec(tx, insert, run, 4, "rollback"), outcome(rowsOf(tx, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1", run)),
			outcome(nil, tx.Rollback()), outcome(rowsOf(a, "SELECT n, t FROM "+scratch+" WHERE run = $1 ORDER BY n", run)))
		return seen, nil
	})
	attempt("error inside a transaction", func() (interface{}, error) {
		tx, err := b.Begin()
		if err != nil {
			return nil, err
		}
		seen := []interface{}{exec(tx, "SELECT 1/$1::int", 0), outcome(rowsOf(tx, count, "failed")), exec(tx, "SELECT 1"),
			outcome(rowsOf(tx, "SELECT 'new'")), outcome(nil, tx.Rollback()), outcome(rowsOf(b, count, "after"))}
		tx, err = b.Begin()
		if err != nil {
			return seen, err
		}
		seen = append(seen, exec(tx, "SAVEPOINT s"), exec(tx, "SELECT 1/0"), exec(tx, "ROLLBACK TO SAVEPOINT s"), outcome(rowsOf(tx, count, "after savepoint")),
			outcome(nil, tx.Commit()))
		return seen, nil
	})
	attempt("transaction options", func() (interface{}, error) {
		tx, err := a.BeginTx(bg, &sql.TxOptions{Isolation: sql.LevelSerializable, ReadOnly: true})
		if err != nil {
			return nil, err
		}
		seen := []interface{}{outcome(rowsOf(tx, "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')")),
			outcome(rowsOf(tx, count, "serializable")), exec(tx, insert, run, 99, "read only")}
		return append(seen, outcome(nil, tx.Rollback())), nil
	})
	attempt("prepare in a transaction", func() (interface{}, error) {
		tx, err := b.Begin()
		if err != nil {
			return nil, err
		}
		stmt, err := tx.Prepare(insert)
		if err != nil {
			return nil, err
		}
		seen := []interface{}{}
		for i := 0; i < 3; i++ {
			result, err := stmt.Exec(run, 50+i, "prepared in tx")
			if err == nil {
				n, _ := result.RowsAffected()
				seen = append(seen, n)
			} else {
				seen = append(seen, outcome(nil, err))
			}
		}
		seen = append(seen, outcome(nil, stmt.Close()), outcome(nil, tx.Commit()),
			outcome(rowsOf(b, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n >= 50 AND n < 60", run)))
		return seen, nil
	})

	// pq.CopyIn: COPY FROM STDIN in a transaction, CopyData per Exec, CopyDone at the Exec without values.
	attempt("copy in", func() (interface{}, error) {
		tx, err := a.Begin()
		if err != nil {
			return nil, err
		}
		stmt, err := tx.Prepare(pq.CopyIn(scratch, "run", "n", "t"))
		if err != nil {
			return nil, err
		}
		for i := 0; i < 300; i++ {
			if _, err := stmt.Exec(run, 1000+i, fmt.Sprintf("copy %d ü\t\\", i)); err != nil {
				return i, err
			}
		}
		_, err = stmt.Exec()
		seen := []interface{}{outcome(nil, err), outcome(nil, stmt.Close()), outcome(nil, tx.Commit())}
		return append(seen, outcome(rowsOf(a, "SELECT count(*)::int, sum(n)::int8, max(t) FROM "+scratch+" WHERE run = $1 AND n >= 1000", run))), nil
	})
	attempt("copy in failing", func() (interface{}, error) {
		tx, err := b.Begin()
		if err != nil {
			return nil, err
		}
		stmt, err := tx.Prepare(pq.CopyIn(scratch, "run", "n"))
		if err != nil {
			return nil, err
		}
		seen := []interface{}{}
		for _, n := range []interface{}{2000, "not a number", 2002} {
			_, err := stmt.Exec(run, n)
			seen = append(seen, outcome(nil, err))
		}
		_, err = stmt.Exec()
		seen = append(seen, outcome(nil, err), outcome(nil, stmt.Close()), outcome(nil, tx.Rollback()))
		return append(seen, outcome(rowsOf(b, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n >= 2000", run))), nil
	})
	attempt("copy in outside a transaction", func() (interface{}, error) {
		stmt, err := b.Prepare(pq.CopyIn(scratch, "run", "n"))
		if err != nil {
			return nil, err
		}
		_, err1 := stmt.Exec(run, 3000)
		_, err2 := stmt.Exec()
		return []interface{}{outcome(nil, err1), outcome(nil, err2), outcome(nil, stmt.Close()),
			outcome(rowsOf(b, "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n = 3000", run))}, nil
	})

	// A prepared statement whose result shape changes.
	attempt("shape", func() (interface{}, error) {
		stmt, err := a.Prepare("SELECT * FROM " + shape + " WHERE id > $1 ORDER BY id")
		if err != nil {
			return nil, err
		}
		defer stmt.Close()
		before := outcome(rowsOf(stmt2(stmt), "", 0))
		admin("ALTER TABLE " + shape + " ADD COLUMN extra text DEFAULT 'new'")
		after := outcome(rowsOf(stmt2(stmt), "", 0))
		fresh := outcome(rowsOf(a, "SELECT * FROM "+shape+" WHERE id > $1 ORDER BY id", 0))
		admin("ALTER TABLE " + shape + " DROP COLUMN extra")
		return []interface{}{before, after, fresh, outcome(rowsOf(stmt2(stmt), "", 0))}, nil
	})

	// Startup parameters from the DSN (lib/pq sends unknown keys as run-time parameters).
	attempt("startup parameters", func() (interface{}, error) {
		tuned := open("a", "application_name=go-pq search_path='tenant_proxy, public' timezone=America/New_York statement_timeout=300", 1)
		defer tuned.Close()
		read := "SELECT current_setting('application_name') AS app, current_setting('search_path') AS sp, current_setting('TimeZone') AS tz, current_setting('statement_timeout') AS st, '2024-02-29 12:00:00+00'::timestamptz::text AS ts"
		return []interface{}{outcome(rowsOf(tuned, read)), outcome(rowsOf(tuned, "SELECT current_tenant() IS NOT NULL AS unqualified, count(*)::int FROM leads WHERE name <> $1", "x")),
			outcome(rowsOf(tuned, "SELECT pg_sleep(3)")), exec(tuned, "SET search_path = public"), outcome(rowsOf(tuned, read)),
			exec(tuned, "RESET ALL"), outcome(rowsOf(tuned, read)), outcome(rowsOf(tuned, typesQuery, typesArgs()...))}, nil
	})

	// A cancelled context: lib/pq sends a CancelRequest on a connection of its own; the query fails with
	// 57014 and the connection goes on.
	attempt("context cancelled", func() (interface{}, error) {
		ctx, cancel := context.WithCancel(bg)
		defer cancel()
		conn, err := a.Conn(bg)
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		some, err := cancelAtFirstRow(ctx, cancel, conn)
		return []interface{}{some, outcome(nil, err), outcome(rowsOf(conn, count, "after cancel"))}, nil
	})
	attempt("context cancelled in a transaction", func() (interface{}, error) {
		ctx, cancel := context.WithCancel(bg)
		defer cancel()
		tx, err := b.BeginTx(ctx, nil)
		if err != nil {
			return nil, err
		}
		some, err := cancelAtFirstRow(ctx, cancel, tx)
		// database/sql rolls the transaction back itself when its context ends (racing an explicit Rollback).
		return []interface{}{some, outcome(nil, err), outcome(rowsOf(b, count, "after"))}, nil
	})

	attempt("context deadline on a sleep", func() (interface{}, error) {
		conn, err := b.Conn(bg)
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(bg, 300*time.Millisecond)
		defer cancel()
		_, err = conn.ExecContext(ctx, "SELECT pg_sleep(5)")
		// lib/pq marks a connection it sent a cancel for as bad; database/sql then opens another.
		seen := []interface{}{outcome(nil, err), outcome(rowsOf(conn, count, "on the cancelled connection")), outcome(nil, conn.Close())}
		return append(seen, outcome(rowsOf(b, count, "after"))), nil
	})
	// Pools: more goroutines than connections, two tenants at once.
	attempt("pools", func() (interface{}, error) {
		pools := map[string]*sql.DB{"a": open("a", "", 3), "b": open("b", "", 3)}
		defer pools["a"].Close()
		defer pools["b"].Close()
		stmts := map[string]*sql.Stmt{}
		for name, db := range pools {
			stmt, err := db.Prepare(count)
			if err != nil {
				return nil, err
			}
			defer stmt.Close()
			stmts[name] = stmt
		}
		var mu sync.Mutex
		results := map[string]interface{}{}
		var wg sync.WaitGroup
		for _, name := range []string{"a", "b"} {
			for g := 0; g < 8; g++ {
				wg.Add(1)
				go func(name string, g int) {
					defer wg.Done()
					db := pools[name]
					seen := []interface{}{}
					for i := 0; i < 4; i++ {
						var n int
						var tenant string
						err := db.QueryRow("SELECT count(*)::int + $1, min(tenant_id::text) FROM leads", i).Scan(&n, &tenant)
						seen = append(seen, outcome([]interface{}{n, tenant}, err))
						err = stmts[name].QueryRow("x").Scan(&n, &tenant)
						seen = append(seen, outcome([]interface{}{n, tenant}, err))
					}
					tx, err := db.Begin()
					if err == nil {
						seen = append(seen, exec(tx, insert, run, 10000+g, "pool "+name), outcome(rowsOf(tx, count, "in pool tx")), outcome(nil, tx.Commit()))
					} else {
						seen = append(seen, outcome(nil, err))
					}
					if g%3 == 0 {
						seen = append(seen, exec(db, "SELECT 1/$1::int", 0))
					}
					mu.Lock()
					results[fmt.Sprintf("%s%02d", name, g)] = seen
					mu.Unlock()
				}(name, g)
			}
		}
		wg.Wait()
		results["written"] = outcome(rowsOf(pools["a"], "SELECT count(*)::int FROM "+scratch+" WHERE run = $1 AND n >= 10000", run))
		return results, nil
	})

	attempt("binary parameters", func() (interface{}, error) {
		bin := open("b", "binary_parameters=yes", 1)
		defer bin.Close()
		return []interface{}{outcome(rowsOf(bin, count, "nobody")), outcome(rowsOf(bin, "SELECT $1::bytea AS by, $2::text AS t", []byte{0, 1, 254}, "x")),
			outcome(rowsOf(bin, "SELECT $1::int AS v", "x")), exec(bin, insert, run, 5000, "binary"), outcome(rowsOf(bin, count, "after"))}, nil
	})

	attempt("listen", func() (interface{}, error) {
		_, err := b.Exec("LISTEN go_pq_channel")
		return outcome(b.Ping(), nil), err
	})
	attempt("cleanup", func() (interface{}, error) {
		result, err := a.Exec("DELETE FROM "+scratch+" WHERE run = $1", run)
		if err != nil {
			return nil, err
		}
		return result.RowsAffected()
	})
}

// stmtQuerier lets rowsOf run a prepared statement (the query text is ignored).
type stmtQuerier struct{ stmt *sql.Stmt }

func (s stmtQuerier) QueryContext(ctx context.Context, _ string, args ...interface{}) (*sql.Rows, error) {
	return s.stmt.QueryContext(ctx, args...)
}

func stmt2(stmt *sql.Stmt) querier { return stmtQuerier{stmt} }
