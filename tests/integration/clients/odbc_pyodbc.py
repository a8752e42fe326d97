"""psqlodbc (Debian's odbc-postgresql, under unixODBC) driven from Python through pyodbc, with its own
protocol habits: the SETs it sends at connect (DateStyle, extra_float_digits, ...), server-side prepares
(UseServerSidePrepare) under names like _PLAN0x..., Parse/Describe of a statement before it runs (for
SQLNumResultCols and SQLDescribeParam), the levels of rollback on errors (Protocol=7.4-0/1/2; level 2
wraps each statement of a transaction in SAVEPOINT _EXEC_SVP_... and RELEASE), UseDeclareFetch (DECLARE
... CURSOR and FETCH, in a transaction of its own with autocommit on), autocommit off (psqlodbc sends
BEGIN itself), executemany, large results, catalog functions, and SQLCancel.

DRIVER_CONFIG (JSON) says where to connect: {host, port, database, run, clients: {a: {user, password},
b: {...}}, context}. Through the proxy, `context` is null and each client's password is its token;
directly, `context` is {key, tenants: {a, b}}: the script sets each connection's signed tenant context
itself, as the proxy would, so Row-Level Security gives both runs the same rows. Prints one JSON object
per step, so a run through the proxy can be compared with a direct one line by line.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import uuid
from typing import Any

import pyodbc

config = json.loads(os.environ["DRIVER_CONFIG"])
run = config["run"]
# Which variants of connection options to run (all by default): a test may pick a few.
only = config.get("variants")

# psqlodbc's common connection options. Protocol=7.4-<n>: the level of rollback on errors (0: none, the
# transaction stays aborted; 1: the whole transaction, psqlodbc's default; 2: the statement, with a
# SAVEPOINT around each). UseDeclareFetch=1 reads results through a cursor, Fetch rows at a time.
VARIANTS = {
    "defaults": "",
    "no server prepare": "UseServerSidePrepare=0",
    "server prepare, statement rollback": "UseServerSidePrepare=1;Protocol=7.4-2",
    "no rollback": "Protocol=7.4-0",
    "transaction rollback": "Protocol=7.4-1",
    "declare fetch": "UseDeclareFetch=1;Fetch=7",
    "declare fetch, statement rollback": "UseDeclareFetch=1;Fetch=100;Protocol=7.4-2",
    "no server prepare, declare fetch": "UseServerSidePrepare=0;UseDeclareFetch=1;Fetch=3",
}


def emit(step: str, **value: Any) -> None:
    print(json.dumps({"step": step, **value}, sort_keys=True, default=str), flush=True)


def failure(error: Exception) -> dict[str, Any]:
    """pyodbc's error: the SQLSTATE psqlodbc reports and its message (the server's text, in psqlodbc's
    words), without the native error number, which is psqlodbc's own."""
    state, message = (error.args + ("", ""))[:2] if error.args else ("", str(error))
    return {"error": {"state": state, "message": str(message)}}


def plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Row":
        return [plain(item) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (decimal.Decimal, datetime.date, datetime.time, datetime.datetime, uuid.UUID)):
        return f"{type(value).__name__}:{value}"
    if isinstance(value, float):
        return repr(value)
    return value


def step(name: str, action: Any) -> None:
    try:
        emit(name, result=plain(action()))
    except pyodbc.Error as error:
        emit(name, **failure(error))


def attempt(action: Any) -> Any:
    """The result of `action`, or its error, so one step can go on after a failure."""
    try:
        return plain(action())
    except pyodbc.Error as error:
        return failure(error)


def connection_string(name: str, options: str) -> str:
    client = config["clients"][name]
    return (f"Driver={{PostgreSQL Unicode}};Server={config['host']};Port={config['port']};"
            f"Database={config['database']};Uid={client['user']};Pwd={client['password']};"
            f"SSLmode=disable;{options}")


def connect(name: str, options: str, autocommit: bool = True) -> pyodbc.Connection:
    connection = pyodbc.connect(connection_string(name, options), autocommit=True, timeout=20)
    if config["context"]:
        # The proof the proxy's context carries: "<expiry>:<hex HMAC-SHA256(key, '<pid>:<expiry>:<tenant>')>".
        tenant = config["context"]["tenants"][name]
        pid = connection.execute("SELECT pg_backend_pid()").fetchval()
        expires = int(time.time()) + 3600
        mac = hmac.new(config["context"]["key"].encode(), f"{pid}:{expires}:{tenant}".encode(), hashlib.sha256).hexdigest()
        connection.execute("SELECT set_config('app.current_tenant', ?, false), set_config('tenant_proxy.proof', ?, false)",
                           tenant, f"{expires}:{mac}").fetchall()
    connection.autocommit = autocommit
    return connection


def rows(cursor: pyodbc.Cursor) -> list[Any]:
    return [list(row) for row in cursor.fetchall()]


def query(connection: pyodbc.Connection, sql: str, *params: Any) -> Any:
    return attempt(lambda: rows(connection.execute(sql, *params)))


def count_run(connection: pyodbc.Connection, label: str) -> Any:
    return query(connection, "SELECT count(*) FROM drivers_scratch WHERE run = ? AND t LIKE ?", run, label + "%")


def variant_steps(variant: str, options: str) -> None:
    label = f"[{variant}]"
    tag = "v" + hashlib.sha256(variant.encode()).hexdigest()[:6]
    a = connect("a", options)
    b = connect("b", options)

    step(f"{label} tenant", lambda: rows(a.execute("SELECT count(*), min(tenant_id::text) FROM leads")))
    step(f"{label} other tenant", lambda: rows(b.execute("SELECT count(*), min(tenant_id::text) FROM leads")))
    # What psqlodbc set at connect, and what the server's answers look like with it.
    step(f"{label} settings", lambda: rows(a.execute(
        "SELECT current_setting('DateStyle'), current_setting('extra_float_digits'), current_setting('client_encoding'),"
        " current_setting('TimeZone') <> '', current_setting('application_name')")))
    step(f"{label} types", lambda: rows(a.execute(
        "SELECT 0.1::float8, 1.5::float4, 12.3400::numeric(10,4), date '2024-02-29', timestamp '2024-02-29 12:34:56.789',"
        " 'a'::bytea, '11111111-1111-4111-8111-111111111111'::uuid, true, 'x'::text, NULL::int, interval '1 day 2 hours'")))
    # Parameters: psqlodbc binds them (server-side prepare) or inlines them as literals (without).
    step(f"{label} parameters", lambda: [
        rows(a.execute("SELECT ?::int + 1, ?::text || 'x', ?", 41, "y", None)),
        rows(a.execute("SELECT count(*) FROM leads WHERE name <> ?", "nobody")),
        rows(a.execute("SELECT ? = ?, ?::numeric * 2", "quote'd", "quote'd", decimal.Decimal("1.25"))),
        rows(a.execute("SELECT ?::date, ?::timestamp", datetime.date(2024, 1, 2), datetime.datetime(2024, 1, 2, 3, 4, 5))),
        rows(a.execute("SELECT ?::bytea", b"\x00\x01\xff")),
    ])
    # The same statement text again and again: pyodbc prepares it once (SQLPrepare) per cursor.
    def reused() -> Any:
        cursor = a.cursor()
        seen = []
        for n in range(5):
            seen.append(rows(cursor.execute("SELECT ?::int * 2, count(*) FROM leads", n)))
        other = b.cursor()
        b.autocommit = False
        seen.append(rows(other.execute("SELECT count(*) FROM leads")))   # b holds a server connection
        for n in range(3):
            seen.append(rows(cursor.execute("SELECT ?::int * 2, count(*) FROM leads", n)))
        b.rollback()
        b.autocommit = True
        return seen
    step(f"{label} statement reused", reused)
    step(f"{label} description", lambda: [list(column[:2]) for column in
                                          a.execute("SELECT id, name, tenant_id FROM leads WHERE id < ?", 0).description])

    # executemany, with pyodbc's fast_executemany (parameter arrays) and without.
    def many(fast: bool) -> Any:
        cursor = a.cursor()
        cursor.fast_executemany = fast
        cursor.executemany("INSERT INTO drivers_scratch (run, n, t) VALUES (?, ?, ?)",
                           [(run, n, f"{tag}many{fast}") for n in range(25)])
        return [cursor.rowcount, count_run(a, f"{tag}many{fast}")]
    step(f"{label} executemany", lambda: many(False))
    step(f"{label} fast executemany", lambda: many(True))
    step(f"{label} executemany with an error", lambda: [
        attempt(lambda: a.cursor().executemany("INSERT INTO drivers_scratch (run, n, t) VALUES (?, ?, ?)",
                                                [(run, 1, f"{tag}bad"), (run, "x", f"{tag}bad"), (run, 3, f"{tag}bad")])),
        count_run(a, f"{tag}bad"), query(a, "SELECT 1")])

    # Large results, read all at once, in pieces, and abandoned part way.
    def large() -> Any:
        cursor = a.cursor()
        cursor.execute("SELECT g, repeat('x', g % 50) FROM generate_series(1, 20000) AS g")
        total = count = 0
        while True:
            chunk = cursor.fetchmany(1000)
            if not chunk:
                break
            count += len(chunk)
            total += sum(row[0] + len(row[1]) for row in chunk)
        return [count, total]
    step(f"{label} large result", large)
    def abandoned() -> Any:
        cursor = a.cursor()
        cursor.execute("SELECT g FROM generate_series(1, 5000) AS g")
        first = [row[0] for row in cursor.fetchmany(3)]
        cursor.close()
        return [first, query(a, "SELECT count(*) FROM leads")]
    step(f"{label} large result abandoned", abandoned)

    # Errors with autocommit on, then the session goes on.
    step(f"{label} errors", lambda: [query(a, "SELECT 1/0"), query(a, "SELECT 1"), query(a, "SELECT no_such_column FROM leads"),
                                     query(a, "SELECT ?::int", "three"), query(a, "SELECT count(*) FROM leads")])
    step(f"{label} multiple statements", lambda: query(a, "SELECT 1; SELECT 2"))
    def more_results() -> Any:
        cursor = a.execute("SELECT 1 AS one; SELECT 2 AS two, 3 AS three")
        seen = [rows(cursor)]
        while cursor.nextset():
            seen.append(rows(cursor))
        return seen
    step(f"{label} result sets", more_results)

    # Autocommit off: psqlodbc sends BEGIN before the transaction's first statement.
    c = connect("a", options, autocommit=False)
    def transaction() -> Any:
        seen = [query(c, "INSERT INTO drivers_scratch (run, n, t) VALUES (?, 1, ?)", run, f"{tag}tx"), count_run(c, f"{tag}tx")]
        c.rollback()
        seen.append(count_run(c, f"{tag}tx"))
        c.execute("INSERT INTO drivers_scratch (run, n, t) VALUES (?, 2, ?)", run, f"{tag}tx")
        c.commit()
        seen.append(count_run(c, f"{tag}tx"))
        c.commit()
        return seen
    step(f"{label} transaction", transaction)
    def error_in_transaction() -> Any:
        seen = [query(c, "INSERT INTO drivers_scratch (run, n, t) VALUES (?, 3, ?)", run, f"{tag}err"),
                query(c, "SELECT 1/0"),
                query(c, "INSERT INTO drivers_scratch (run, n, t) VALUES (?, 4, ?)", run, f"{tag}err"),
                count_run(c, f"{tag}err"),
                query(c, "SELECT current_setting('transaction_isolation')")]
        seen.append(attempt(c.commit))
        seen.append(count_run(c, f"{tag}err"))
        c.commit()
        return seen
    step(f"{label} error in a transaction", error_in_transaction)
    def error_then_rollback() -> Any:
        seen = [query(c, "SELECT count(*) FROM leads"), query(c, "SELECT no_such_function()"), query(c, "SELECT 2")]
        c.rollback()
        seen.append(query(c, "SELECT count(*) FROM leads"))
        c.commit()
        return seen
    step(f"{label} error then rollback", error_then_rollback)
    def savepoints() -> Any:
        seen = [query(c, "INSERT INTO drivers_scratch (run, n, t) VALUES (?, 5, ?)", run, f"{tag}sp"),
                attempt(lambda: c.execute("SAVEPOINT mine").rowcount),
                query(c, "INSERT INTO drivers_scratch (run, n, t) VALUES (?, 6, ?)", run, f"{tag}sp"),
                query(c, "SELECT 1/0"),
                attempt(lambda: c.execute("ROLLBACK TO SAVEPOINT mine").rowcount),
                query(c, "INSERT INTO drivers_scratch (run, n, t) VALUES (?, 7, ?)", run, f"{tag}sp"),
                attempt(c.commit), count_run(c, f"{tag}sp")]
        c.commit()
        return seen
    step(f"{label} savepoints", savepoints)
    def isolation() -> Any:
        seen = [query(c, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")]
        seen.append(query(c, "SELECT current_setting('transaction_isolation'), count(*) FROM leads"))
        c.commit()
        seen.append(query(c, "SELECT current_setting('transaction_isolation')"))
        c.commit()
        return seen
    step(f"{label} isolation", isolation)
    step(f"{label} large result in a transaction", lambda: [
        query(c, "SELECT count(*), sum(length(x)) FROM (SELECT repeat('y', g % 100) AS x FROM generate_series(1, 30000) AS g) AS s"),
        len(c.execute("SELECT g FROM generate_series(1, 12345) AS g").fetchall()),
        attempt(c.commit)])
    # Settings changed by the client itself follow it (in transaction mode, across server connections).
    def settings() -> Any:
        seen = [query(a, "SET extra_float_digits = 0"), query(a, "SELECT 0.1::float8 + 0.2::float8")]
        b.autocommit = False
        seen.append(query(b, "SELECT count(*) FROM leads"))
        seen.append(query(a, "SHOW extra_float_digits"))
        b.rollback()
        b.autocommit = True
        seen.append(query(a, "SET extra_float_digits = 3"))
        seen.append(query(a, "SELECT 0.1::float8 + 0.2::float8"))
        return seen
    step(f"{label} settings follow", settings)
    # Catalog functions: psqlodbc's own queries of pg_catalog.
    step(f"{label} tables", lambda: sorted([row.table_name, row.table_type] for row in a.cursor().tables(table="leads", schema="public")))
    step(f"{label} columns", lambda: [[row.column_name, row.type_name] for row in a.cursor().columns(table="leads", schema="public")])
    step(f"{label} primary keys", lambda: [row.column_name for row in a.cursor().primaryKeys(table="leads", schema="public")])
    step(f"{label} cleanup", lambda: a.execute("DELETE FROM drivers_scratch WHERE run = ? AND t LIKE ?", run, tag + "%").rowcount)
    c.close()
    a.close()
    b.close()


def cancel_step() -> None:
    """SQLCancel from another thread while a statement runs. The statement holds an advisory lock keyed
    by this run; a psycopg connection (unixODBC serializes the calls of one process, so not a second
    ODBC connection) watches for it."""
    import psycopg

    a = connect("a", "")
    client = config["clients"]["b"]
    watcher = psycopg.connect(host=config["host"], port=config["port"], dbname=config["database"], user=client["user"],
                              password=client["password"], sslmode="disable", autocommit=True)
    cursor = a.cursor()
    outcome: list[Any] = []

    def sleeper() -> None:
        outcome.append(attempt(lambda: rows(cursor.execute("SELECT pg_advisory_xact_lock(?::bigint), pg_sleep(30)", run))))
    thread = threading.Thread(target=sleeper)
    thread.start()
    deadline = time.monotonic() + 20
    while watcher.execute("SELECT pg_try_advisory_xact_lock(%s::bigint)", (run,)).fetchone()[0]:
        if time.monotonic() > deadline:
            raise SystemExit("the statement never ran")
    cursor.cancel()
    thread.join(30)
    emit("cancel", result=[outcome, query(a, "SELECT count(*) FROM leads")])
    watcher.close()
    a.close()


def extra_steps() -> None:
    """Connection options and habits beyond the variants: statement_timeout, ConnSettings (SQL psqlodbc sends at connect), SSLmode=prefer, getinfo, large and non-ASCII
    parameters, and clients that leave with a transaction open."""
    a = connect("a", "")
    step("statement timeout", lambda: [query(a, "SET statement_timeout = 200"), query(a, "SELECT pg_sleep(2)"),
                                       query(a, "SELECT count(*) FROM leads"), query(a, "RESET statement_timeout"),
                                       query(a, "SHOW statement_timeout")])
    def conn_settings() -> Any:
        c = connect("b", "ConnSettings={SET application_name = 'odbc-app'; SET search_path = public, pg_catalog}")
        seen = [query(c, "SELECT current_setting('application_name'), current_setting('search_path'), count(*) FROM leads")]
        c.autocommit = False
        seen.append(query(c, "SELECT current_setting('application_name')"))
        c.rollback()
        c.close()
        return seen
    step("ConnSettings", conn_settings)
    def prefer() -> Any:
        c = connect("a", "SSLmode=prefer")
        seen = query(c, "SELECT count(*) FROM leads")
        c.close()
        return seen
    step("SSLmode prefer", prefer)
    step("getinfo", lambda: [a.getinfo(pyodbc.SQL_DBMS_NAME), a.getinfo(pyodbc.SQL_DBMS_VER)[:2],
                             a.getinfo(pyodbc.SQL_DATABASE_NAME), a.getinfo(pyodbc.SQL_TXN_CAPABLE)])
    step("large parameters", lambda: [
        rows(a.execute("SELECT length(?), md5(?)", "w" * 2_000_000, "w" * 2_000_000)),
        rows(a.execute("SELECT length(?::bytea)", b"\x07" * 1_500_000)),
        rows(a.execute("SELECT ?, length(?)", "na\u00efve \u2603 \U0001F600", "\u2603"))])
    def isolation_attribute() -> Any:
        """SQL_ATTR_TXN_ISOLATION: psqlodbc sends SET SESSION CHARACTERISTICS, a session setting that
        follows the client while b holds a server connection."""
        c = connect("a", "")
        b = connect("b", "", autocommit=False)
        c.set_attr(pyodbc.SQL_ATTR_TXN_ISOLATION, pyodbc.SQL_TXN_SERIALIZABLE)
        seen = [query(b, "SELECT count(*) FROM leads"),
                query(c, "SELECT current_setting('transaction_isolation'), current_setting('default_transaction_isolation')")]
        c.autocommit = False
        seen.append(query(c, "SELECT current_setting('transaction_isolation'), count(*) FROM leads"))
        c.commit()
        c.set_attr(pyodbc.SQL_ATTR_TXN_ISOLATION, pyodbc.SQL_TXN_READ_COMMITTED)
        seen.append(query(c, "SELECT current_setting('transaction_isolation')"))
        c.rollback()
        b.rollback()
        c.close()
        b.close()
        return seen
    step("isolation attribute", isolation_attribute)
    def leaving() -> Any:
        for n in range(3):
            c = connect("a", "", autocommit=False)
            c.execute("INSERT INTO drivers_scratch (run, n, t) VALUES (?, ?, 'left')", run, 800 + n)
            c.close()
        c = connect("a", "", autocommit=False)
        c.execute("INSERT INTO drivers_scratch (run, n, t) VALUES (?, 900, 'left')", run)
        attempt(lambda: c.execute("SELECT 1/0"))
        c.close()
        b = connect("b", "")
        seen = [query(b, "SELECT count(*), min(tenant_id::text) FROM leads"), count_run(a, "left")]
        b.close()
        return seen
    step("clients leaving a transaction open", leaving)
    a.close()


for variant, options in VARIANTS.items():
    if only is None or variant in only:
        variant_steps(variant, options)
if only is None or "cancel" in only:
    cancel_step()
if only is None or "extra" in only:
    extra_steps()
sys.exit(0)
