"""The randomized comparison of issue 12: random interleavings of extended-protocol messages, simple
Queries, Close, Flush and COPY, with random errors, sent directly to Postgres and through the proxy in
both pool modes; the two reply streams must be equal, message by message.

Hypothesis generates the scenarios with a fixed seed (derandomize) and a bounded number of examples.
Shrinking is off: a failing scenario can cost a read timeout per try, and the failure message already
holds the whole protocol trace (what was sent, both reply streams side by side). Statements touch only
`diff_scratch`, a table without Row-Level Security, so their results do not depend on the tenant
context, and they contain nothing the SQL guard refuses. Between writes that leave the client idle, a
client of another tenant runs the unnamed statement and a statement named like the scenario's, so in
transaction mode (one server connection) every write may land on a server connection that another
client used in between.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from differential import (
    COPY_DONE,
    FLUSH,
    SYNC,
    Step,
    Transcript,
    Wire,
    Write,
    run_and_compare,
    connect_direct,
    connect_proxy,
    first_difference,
    flush_write,
    run_direct,
    step_bind,
    step_close,
    step_copy_data,
    step_copy_fail,
    step_describe,
    step_execute,
    step_parse,
    step_query,
)
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from support import ACME, GLOBEX, ProxyProcess, unprotected_table

MODES = {"session": {"pool": {"mode": "session"}}, "transaction": {"pool": {"mode": "transaction", "size": 1}}}
EXAMPLES_PER_MODE = 400
SEED_ROWS = "INSERT INTO diff_scratch VALUES (1, 'one'), (2, 'two')"

STATEMENTS = ("", "s1", "s2")
PORTALS = ("", "p1", "p2")
SIMPLE_QUERIES = (
    "SELECT 1",
    "SELECT n, t FROM diff_scratch ORDER BY n",
    "INSERT INTO diff_scratch VALUES (3, 'three')",
    "INSERT INTO diff_scratch VALUES (1, 'again')",
    "UPDATE diff_scratch SET t = 'changed' WHERE n = 2",
    "DELETE FROM diff_scratch WHERE n = 3",
    "SELECT 1/0",
    "SELEC 1",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT a",
    "ROLLBACK TO a",
    "RELEASE a",
    "",
    ";",
    "SELECT 1; SELECT 2",
    "INSERT INTO diff_scratch VALUES (4, 'four'); SELECT 1/0; SELECT 3",
    "BEGIN; INSERT INTO diff_scratch VALUES (5, 'five'); COMMIT",
    "SELECT generate_series(1, 3)",
    "COPY (SELECT n, t FROM diff_scratch ORDER BY n) TO STDOUT",
    "SET application_name = 'renamed'",
    "RESET ALL",
    # statements Postgres runs without a snapshot, which transaction mode's context goes behind (not the
    # transaction characteristics: behind a Parse and Flush with no Sync, docs/pool-modes.md)
    "SET LOCAL work_mem = '2MB'",
    "LOCK TABLE diff_scratch IN ROW EXCLUSIVE MODE",
    "SHOW work_mem",
    # multi-statement Queries mixing settings, transaction control and errors
    "SET LOCAL work_mem = '1MB'; SELECT 1",
    "BEGIN; SET LOCAL work_mem = '2MB'; SELECT 1/0",
    "SET application_name = 'x'; BEGIN; SELECT 1",
    "COMMIT; BEGIN",
    "BEGIN; SAVEPOINT a; SELECT 1/0; ROLLBACK TO a; SELECT 1",
    "SELECT 1; SELEC 2",
    "SELECT 1/0; SELECT 1",
    "ROLLBACK; BEGIN; SELECT 1",
    "COMMIT; SELECT 1/0",
    "SELECT 1; ; SELECT 2",
    "START TRANSACTION",
    "END",
    "ABORT",
    "SAVEPOINT b",
    "ROLLBACK TO b",
    "RESET application_name",
    "SET application_name TO DEFAULT",
    # a cursor (a portal the SQL names), only inside a block
    "DECLARE c CURSOR FOR SELECT n FROM diff_scratch ORDER BY n",
    "FETCH 1 FROM c",
    "CLOSE c",
    # statement management in SQL, and the search_path a client's statements are keyed by
    "DEALLOCATE s1",
    "DEALLOCATE ALL",
    "DISCARD ALL",
    "DEALLOCATE s1; SELECT 1",
    "SELECT 1; DEALLOCATE s2",
    "SET search_path = pg_catalog",
    "SET search_path TO DEFAULT",
)
PARSE_TEXTS = (
    "SELECT $1::int + 1",
    "SELECT $1::text, $2::text",
    "INSERT INTO diff_scratch VALUES ($1::int, $2::text)",
    "SELECT n, t FROM diff_scratch ORDER BY n",
    "SELECT generate_series(1, $1::int)",
    "SELECT 1/0",
    "SELEC 1",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "",
    "COPY (SELECT n FROM diff_scratch ORDER BY n) TO STDOUT",
    "SET LOCAL work_mem = '3MB'",
    "LOCK TABLE diff_scratch IN ACCESS SHARE MODE",
    "SAVEPOINT a",
    "ROLLBACK TO a",
    "RELEASE a",
    "SET application_name = 'extended'",
    "SELECT 1; SELECT 2",  # refused at Parse: one statement only
    "SELECT 10 / $1::int",  # fails at Execute with '0'
    "UPDATE diff_scratch SET t = $1::text WHERE n = 1",
    "FETCH 2 FROM c",
    "DEALLOCATE s1",
)
VALUES = ("0", "1", "2", "3", "4", "x", "hello", None)
COPY_QUERIES = ("COPY diff_scratch FROM STDIN", "SELECT 1; COPY diff_scratch FROM STDIN", "COPY diff_scratch FROM STDIN; SELECT 2")
COPY_ROWS = (b"6\tsix\n", b"7\tseven\n", b"x\tnot a number\n", b"1\tduplicate\n", b"8\n", b"9\tni", b"ne\n")

# ---------------------------------------------------------------------------------------------
# Strategies.

single_steps = st.one_of(
    st.builds(step_query, st.sampled_from(SIMPLE_QUERIES)),
    st.builds(step_parse, st.sampled_from(STATEMENTS), st.sampled_from(PARSE_TEXTS)),
    st.builds(step_bind, st.sampled_from(PORTALS), st.sampled_from(STATEMENTS), st.lists(st.sampled_from(VALUES), max_size=2)),
    st.builds(step_describe, st.sampled_from("SP"), st.sampled_from(STATEMENTS + PORTALS)),
    st.builds(step_execute, st.sampled_from(PORTALS), st.sampled_from((0, 0, 1, 2))),
    st.builds(step_close, st.sampled_from("SP"), st.sampled_from(STATEMENTS + PORTALS)),
    st.just(SYNC),
    st.just(FLUSH),
)


@st.composite
def copy_in_block(draw: Any) -> tuple[Step, ...]:
    """COPY FROM STDIN, by simple Query (maybe with another statement before or after it) or by
    Parse/Bind/Execute of statement names no other step uses, some CopyData (maybe bad rows, so the server
    fails the COPY and later CopyData comes after the failure), maybe Syncs or a Flush inside, and CopyDone
    or CopyFail: no COPY is left open."""
    if draw(st.booleans()):
        start: tuple[Step, ...] = (step_query(draw(st.sampled_from(COPY_QUERIES))),)
    else:
        start = (step_parse("copy_in", "COPY diff_scratch FROM STDIN"), step_bind("copy_p", "copy_in", []), step_execute("copy_p"))
    body = [step_copy_data(row) for row in draw(st.lists(st.sampled_from(COPY_ROWS), max_size=3))]
    for inside in draw(st.lists(st.sampled_from((SYNC, FLUSH, SYNC)), max_size=2)):
        body.insert(draw(st.integers(0, len(body))), inside)
    end = draw(st.sampled_from((COPY_DONE, step_copy_fail("the client gave up"))))
    closing = () if len(start) == 1 else (SYNC, step_close("S", "copy_in"))
    return start + tuple(body) + (end,) + closing


copy_out = st.builds(
    lambda extended: (
        (step_parse("", "COPY (SELECT n, t FROM diff_scratch ORDER BY n) TO STDOUT"), step_bind("", "", []), step_execute(""))
        if extended
        else (step_query("COPY (SELECT n, t FROM diff_scratch ORDER BY n) TO STDOUT"),)
    ),
    st.booleans(),
)


@st.composite
def extended_block(draw: Any) -> tuple[Step, ...]:
    """Maybe Close of the statement (so a named Parse need not fail), Parse, Bind (usually with as
    many values as the text has parameters), maybe Describe of the portal, Executes, maybe with a row
    limit that suspends the portal (then maybe a Flush, a Describe of the portal or a Sync before the
    next), maybe Close of the portal, and maybe a Sync."""
    statement, portal, sql = draw(st.sampled_from(STATEMENTS)), draw(st.sampled_from(PORTALS)), draw(st.sampled_from(PARSE_TEXTS))
    count = draw(st.one_of(st.just(sql.count("$")), st.integers(0, 2)))
    values = draw(st.lists(st.sampled_from(VALUES), min_size=count, max_size=count))
    steps = [step_close("S", statement)] if statement and draw(st.booleans()) else []
    steps += [step_parse(statement, sql), step_bind(portal, statement, values)]
    if draw(st.booleans()):
        steps.append(step_describe("P", portal))
    for max_rows in draw(st.lists(st.sampled_from((0, 1, 2)), min_size=1, max_size=3)):
        steps.append(step_execute(portal, max_rows))
        if max_rows and draw(st.integers(0, 3)) == 0:
            steps.append(draw(st.sampled_from((FLUSH, step_describe("P", portal), SYNC))))
    if draw(st.integers(0, 3)) == 0:
        steps.append(step_close("P", portal))
    if draw(st.booleans()):
        steps.append(SYNC)
    return tuple(steps)


single_items = single_steps.map(lambda step: (step,))
items = st.one_of(single_items, extended_block(), extended_block(), extended_block(), copy_in_block(), copy_out)
terminated_writes = st.lists(items, min_size=1, max_size=6).map(lambda parts: Write(tuple(s for part in parts for s in part)))
# A Flush-ended write is followed by a terminated one, as drivers do: after an error in it, Postgres
# skips everything up to the next Sync, so a second Flush-ended write would get no reply at all.
flush_pairs = st.tuples(st.builds(flush_write, st.sampled_from(STATEMENTS), st.sampled_from(PARSE_TEXTS)), terminated_writes)
FINAL = Write((step_query("ROLLBACK"), step_query("SELECT n, t FROM diff_scratch ORDER BY n")))
scenarios = st.lists(st.one_of(terminated_writes.map(lambda write: (write,)), flush_pairs), min_size=1, max_size=5).map(
    lambda groups: [write for group in groups for write in group] + [FINAL]
)

# The inputs of issue 12 that fit a single client, and the kinds the random search may reach late.
UNNAMED_ACROSS_SYNCS = [
    Write((step_parse("", "SELECT $1::text, $2::text"), SYNC)),
    Write((step_describe("S", ""), SYNC, step_bind("", "", ["hello", "world"]), step_execute(""), SYNC)),
    FINAL,
]
QUERY_BEHIND_FAILING_PARSE = [
    Write((step_parse("", "SELEC 1"), step_query("SELECT 1"), SYNC)),
    Write((step_query("RESET ALL"),)),
    Write((step_query("SELECT 1"),)),
    FINAL,
]
ASYNCPG_FLUSH = [
    flush_write("", "SELECT $1::int + 1"),
    Write((step_bind("", "", ["41"]), step_execute(""), SYNC)),
    flush_write("s1", "SELECT $1::text, $2::text"),
    Write((step_bind("p1", "s1", ["a", "b"]), step_describe("P", "p1"), step_execute("p1", 1), SYNC)),
    FINAL,
]
COPY_WITH_SYNC_AND_FAILURE = [
    Write((step_query("BEGIN"),)),
    Write((step_parse("copy_in", "COPY diff_scratch FROM STDIN"), step_bind("copy_p", "copy_in", []), step_execute("copy_p"),
           step_copy_data(b"6\tsix\n"), SYNC, step_copy_data(b"x\tbad\n"), step_copy_data(b"7\tseven\n"), COPY_DONE, SYNC)),
    Write((step_query("ROLLBACK"), step_query("COPY diff_scratch FROM STDIN"), step_copy_data(b"6\tsix\n"), step_copy_fail("stop"))),
    FINAL,
]
# A Sync among the CopyData of a COPY that then fails: read before the failure (the CopyFail here), the
# server ignores it; read after (the bad row is before it), it ends a group of its own. The COPY TO
# STDOUT behind found the proxy still owing that Sync's place; the Parse behind waited for it forever.
SYNC_AMONG_DATA_OF_A_FAILED_COPY = [
    Write((step_query("COPY diff_scratch FROM STDIN"), step_copy_data(b"6\tsix\n"), SYNC, step_copy_data(b"7\tseven\n"),
           step_copy_fail("stop"), step_query("COPY (SELECT n, t FROM diff_scratch ORDER BY n) TO STDOUT"))),
    Write((step_query("COPY diff_scratch FROM STDIN"), step_copy_data(b"x\tbad\n"), SYNC, COPY_DONE,
           step_parse("", "SELECT n, t FROM diff_scratch ORDER BY n"), step_bind("", "", []), step_execute(""), SYNC)),
    FINAL,
]
# A Parse or Close skipped in an error window changes nothing, and a later group sees the name as it was:
# not there yet (a Bind of it fails, a Parse creates it; s2 has the server connection hold the same
# text, which the proxy shares between names), still there after a Close, and the unnamed statement as
# it was before two Parses of it.
SQL = "SELECT n, t FROM diff_scratch ORDER BY n"
NAMES_AFTER_SKIPPED_CHANGES = [
    Write((step_parse("s2", SQL), step_parse("s1", "SELECT $1::int + 1"), SYNC)),
    Write((step_execute("p1"), step_parse("s3", SQL), SYNC, step_bind("", "s3", []), step_execute(""), SYNC)),
    Write((step_execute("p1"), step_parse("s3", SQL), SYNC, step_parse("s3", SQL), step_bind("", "s3", []), step_execute(""), SYNC)),
    Write((step_execute("p1"), step_parse("", "INSERT INTO diff_scratch VALUES ($1::int, $2::text)"), step_parse("", "ROLLBACK"),
           SYNC)),
    Write((step_bind("", "", []), step_execute(""), SYNC)),
    Write((step_execute("p1"), step_close("S", "s1"), step_parse("s1", "SELECT $1::text, $2::text"), step_close("S", "s1"),
           step_parse("s1", "SELECT generate_series(1, $1::int)"), SYNC, step_bind("", "s1", ["41"]), step_execute(""), SYNC)),
    FINAL,
]
# In a failed block a Parse fails (25P02), Describe of a statement that returns no rows answers, and Bind
# fails as the Parse did. The failing Parse of s2 (the text s1 has, which the server connection holds
# for it) took the statement away from s1, which then had to be prepared again there, and could not.
PARSE_OF_A_HELD_TEXT_IN_A_FAILED_BLOCK = [
    Write((step_parse("s1", "INSERT INTO diff_scratch VALUES ($1::int, $2::text)"), SYNC)),
    Write((step_query("BEGIN"), step_query("SELECT 1/0"))),
    Write((step_parse("s2", "INSERT INTO diff_scratch VALUES ($1::int, $2::text)"), SYNC)),
    Write((step_describe("S", "s1"), SYNC, step_bind("", "s1", ["9", "nine"]), SYNC)),
    FINAL,
]
# The same with the first Parse still in flight when the second comes (one write): the second, in the
# block the client's second Execute failed (55000), must not take the text from s1, whose Bind then fails
# on its parameter count (08P01) as directly, not with 26000 (found by the random search).
PARSE_OF_A_TEXT_IN_FLIGHT_IN_A_FAILED_BLOCK = [
    Write((step_parse("s1", "BEGIN"), step_bind("p1", "s1", []), step_execute("p1", 2), step_execute("p1", 2), SYNC,
           step_parse("s2", "BEGIN"))),
    Write((step_bind("", "s1", ["3"]),)),
    FINAL,
]
# A simple Query skipped in an error window (the Execute of a portal that does not exist failed the block)
# does not drop the unnamed statement, nor does a Parse of it skipped there: the Bind behind fails on its
# parameter count (08P01) as directly, not with the 25P02 of the statement prepared again in the failed
# block (found by the random search).
QUERY_SKIPPED_KEEPS_THE_UNNAMED_STATEMENT = [
    Write((step_parse("s1", "BEGIN"), step_bind("p1", "s1", []), step_execute("p1", 1),
           step_parse("", "SELECT generate_series(1, $1::int)"), step_execute("", 1),
           step_query("INSERT INTO diff_scratch VALUES (4, 'four'); SELECT 3"), step_parse("", "SELECT 1"))),
    Write((step_bind("p1", "", ["x", "x"]),)),
    FINAL,
]
# A Query that may start COPY IN, behind a SET (so the proxy has a settings read-back due after it), in an
# error window: the proxy held the client's next Query until the COPY Query's ReadyForQuery, which only the
# client's Sync behind it brings. Nothing was owed and the relay's loop spun at full CPU, stalling every
# client of the process (found by the random search; now the Query goes on and is skipped, as directly).
COPY_QUERY_IN_AN_ERROR_WINDOW = [
    Write((step_describe("S", "s1"),), terminated=False),
    Write((step_query("SET application_name = 'renamed'"), step_query("COPY diff_scratch FROM STDIN"),
           step_query("COPY (SELECT n, t FROM diff_scratch ORDER BY n) TO STDOUT"))),
    FINAL,
]
# A described statement (s1, no result) whose second Parse fails (42P05) behind a Flush: the Describe
# behind that Parse is skipped, as is everything the client sends up to its Sync, Bind included; the
# proxy's check of s1's result shape must not run it.
DESCRIBED_STATEMENT_IN_AN_ERROR_WINDOW = [
    flush_write("s1", ""),
    Write((step_parse("s2", ""), SYNC)),
    flush_write("s1", "SELECT 1/0"),
    Write((FLUSH, step_bind("", "s1", ["2", None]), step_parse("s2", "INSERT INTO diff_scratch VALUES ($1::int, $2::text)"),
           step_query("SAVEPOINT a"), SYNC, FLUSH)),
    FINAL,
]
PORTAL_SUSPENDED_IN_TRANSACTION = [
    Write((step_query("BEGIN"), step_parse("s1", "SELECT generate_series(1, $1::int)"), step_bind("p1", "s1", ["5"]),
           step_execute("p1", 2), SYNC)),
    Write((step_execute("p1", 2), FLUSH, step_execute("p1", 0), SYNC)),
    Write((step_query("SAVEPOINT a"), step_query("SELECT 1/0"), step_query("ROLLBACK TO a"), step_query("COMMIT"))),
    FINAL,
]

# Extended-query COPY FROM STDIN with a Sync among its CopyData (ignored while the COPY runs) and, after
# its CopyDone, Bind and Execute of another statement before the next Sync: they run in the COPY's group
# when it succeeds; when it fails before the Sync, the Sync ends the group and they run in a new one;
# when it fails after (CopyFail), they are skipped up to the Sync. The queries behind see the table.
EXTENDED_COPY_WITH_MESSAGES_BEHIND = [
    Write((step_parse("s1", "SELECT n, t FROM diff_scratch ORDER BY n"), SYNC)),
    Write((step_parse("copy_in", "COPY diff_scratch FROM STDIN"), step_bind("copy_p", "copy_in", []), step_execute("copy_p"),
           step_copy_data(b"6\tsix\n"), SYNC, step_copy_data(b"7\tseven\n"), COPY_DONE, step_bind("", "s1", []),
           step_execute(""), SYNC)),
    Write((step_bind("copy_p", "copy_in", []), step_execute("copy_p"), step_copy_data(b"x\tbad\n"), SYNC,
           step_copy_data(b"8\teight\n"), COPY_DONE, step_bind("", "s1", []), step_execute(""), SYNC)),
    Write((step_bind("copy_p", "copy_in", []), step_execute("copy_p"), step_copy_data(b"9\tnine\n"), SYNC,
           step_copy_fail("the client gave up"), step_bind("", "s1", []), step_execute(""), SYNC)),
    Write((step_query("BEGIN"), step_bind("copy_p", "copy_in", []), step_execute("copy_p"), step_copy_data(b"10\tten\n"), SYNC,
           step_copy_data(b"1\tduplicate\n"), COPY_DONE, step_bind("", "s1", []), step_execute(""), SYNC)),
    Write((step_query("ROLLBACK"), step_bind("", "s1", []), step_execute(""), SYNC)),
    FINAL,
]
# SQL that drops the client's statements, then, in the same write, a Parse of a name it dropped: Postgres
# has dropped it by then, so the Parse creates it anew. Inside a failed block the DEALLOCATE fails (25P02)
# and the statement stays.
DROPPED_NAME_PARSED_AGAIN_AT_ONCE = [
    Write((step_parse("s1", "SELECT $1::int + 1"), step_parse("s2", SQL), SYNC)),
    Write((step_query("DEALLOCATE s1"), step_parse("s1", "SELECT $1::text, $2::text"), step_bind("", "s1", ["a", "b"]),
           step_execute(""), SYNC)),
    Write((step_parse("", "DEALLOCATE s1"), step_bind("", "", []), step_execute(""), step_parse("s1", "SELECT $1::int + 1"),
           step_bind("", "s1", ["41"]), step_execute(""), SYNC)),
    Write((step_query("DEALLOCATE ALL"), step_parse("s2", "SELECT $1::int + 1"), step_bind("", "s2", ["1"]), step_execute(""),
           step_parse("s1", SQL), SYNC)),
    Write((step_query("DISCARD ALL"), step_parse("s1", "SELECT $1::text, $2::text"), step_bind("", "s1", ["c", "d"]),
           step_execute(""), step_parse("s2", SQL), step_bind("", "s2", []), step_execute(""), SYNC)),
    Write((step_parse("", "DEALLOCATE ALL"), step_bind("", "", []), step_execute(""), step_parse("s2", "SELECT $1::int + 1"),
           step_bind("", "s2", ["2"]), step_execute(""), SYNC)),
    Write((step_query("BEGIN"), step_query("SELECT 1/0"), step_query("DEALLOCATE s2"), step_parse("s2", SQL), SYNC)),
    Write((step_query("ROLLBACK"), step_bind("", "s2", ["3"]), step_execute(""), SYNC)),
    Write((step_query("DEALLOCATE s2"), step_query("DEALLOCATE s2"), step_parse("s2", SQL), step_bind("", "s2", []),
           step_execute(""), SYNC)),
    FINAL,
]
# Describe of a portal that does not exist, then Queries and a Flush with no Sync: Postgres skips the
# Queries with no reply at all, up to the client's Sync. The proxy gave the client the ReadyForQuery of its
# own Sync after the Flush as if a Query had been answered, one ReadyForQuery too many (the first Query
# went upstream before the error came, the second, waiting for the first's group, after; found by the
# random search).
QUERIES_IN_THE_CLIENTS_ERROR_WINDOW = [
    Write((step_describe("P", ""), step_query("SELECT 1"), step_query("SELECT 2"), FLUSH), terminated=False),
    Write((SYNC,)),
    FINAL,
]
# A client that gave settings at startup and changed one: its RESET (or SET ... TO DEFAULT) returns to the
# startup value, which Postgres reports (ParameterStatus) before the reset's ReadyForQuery. Through the
# proxy the server connection's RESET reports its own value, which the proxy hides and replaces behind the
# Query; the client was told the startup value only before its next ReadyForQuery (found by the random
# search with startup settings).
STARTUP = {"application_name": "diffapp", "TimeZone": "Europe/Paris"}
RESET_OF_A_CHANGED_STARTUP_SETTING = [
    Write((step_query("SET application_name = 'renamed'"),)),
    Write((step_query("SET application_name TO DEFAULT"),)),
    Write((step_query("BEGIN"), step_query("SET TimeZone = 'UTC'"), step_query("RESET TimeZone"), step_query("SHOW TimeZone"))),
    Write((step_query("SET application_name = 'renamed'"), step_query("RESET ALL"), step_query("COMMIT"))),
    FINAL,
]
# A RESET of a startup setting, then a SET of it in the same group: the startup value the proxy applies
# again behind the group undid the client's SET (the value read 'diffapp' after, directly 'renamed').
SET_BEHIND_A_RESET_IN_ONE_GROUP = [
    Write((step_parse("", "RESET application_name"), step_bind("", "", []), step_execute(""),
           step_parse("", "SET application_name = 'renamed'"), step_bind("", "", []), step_execute(""), SYNC)),
    Write((step_query("SHOW application_name"),)),
    FINAL,
]
STARTUP_INPUTS = {
    "reset-of-a-changed-startup-setting": RESET_OF_A_CHANGED_STARTUP_SETTING,
    "set-behind-a-reset-in-one-group": SET_BEHIND_A_RESET_IN_ONE_GROUP,
}

# An Execute of a portal bound to `DEALLOCATE s1` in an earlier group (the portal went with its
# transaction): the statement the proxy prepares under the name s1 for the DEALLOCATE to drop (a stand-in)
# stayed on the server connection, as the error skipped the Close right behind the Execute; a later Bind
# of s1, after the client closed its own, bound it (BindComplete, where Postgres answers 26000), and so
# would any client's on that server connection.
STAND_IN_BEHIND_A_FAILED_EXECUTE = [
    Write((step_parse("s1", "DEALLOCATE s1"), step_bind("p1", "s1", []), SYNC)),
    Write((step_execute("p1"), SYNC)),
    Write((step_close("S", "s1"), SYNC)),
    Write((step_bind("", "s1", []), SYNC)),
    FINAL,
]
# A failing Parse, then `DEALLOCATE s1; SELECT 1` and a Bind before the Sync: Postgres skips the Query and
# the Bind. The proxy closed the stand-in behind the Query in a Sync group of its own, which ended the
# error window early: the Bind ran (26000; found by the random search).
STAND_IN_BEHIND_A_QUERY_IN_AN_ERROR_WINDOW = [
    Write((step_parse("s1", "SELECT 1"), SYNC)),
    Write((step_parse("", "SELEC 1"), step_query("DEALLOCATE s1; SELECT 1"), step_bind("", "", []), SYNC)),
    Write((step_bind("", "s1", []), step_execute(""), SYNC)),
    FINAL,
]


class CutWrite(Write):
    """A write that ends inside a message, whose rest opens the next write, as when the network cuts a
    client's data: complete at the ReadyForQuery its other messages bring."""

    def __init__(self, steps: tuple[Step, ...]) -> None:
        super().__init__(steps, terminated=False)

    def complete(self, replies: Sequence[tuple[bytes, bytes]]) -> bool:
        return bool(replies) and replies[-1][0] == b"Z"


# A COPY behind a SET fails while the client's read has ended inside a CopyData: the settings read-back
# due after the Query's ReadyForQuery went upstream inside that CopyData, and the server read the rest of
# it as a message and ended the session (FATAL 08P01; found by the random search sending writes in pieces).
SEVEN = step_copy_data(b"7\tseven\n").data
COPY_DATA_CUT_WHEN_THE_COPY_FAILS = [
    CutWrite((step_query("SET application_name = 'renamed'; COPY diff_scratch FROM STDIN"), step_copy_data(b"x\tbad\n"),
              Step("CopyData(b'7\\tseven\\n'), its first 8 bytes", SEVEN[:8]))),
    Write((Step("... and the rest", SEVEN[8:]), COPY_DONE)),
    FINAL,
]

INPUTS = {
    "unnamed-statement-across-syncs": UNNAMED_ACROSS_SYNCS,
    "query-behind-failing-parse": QUERY_BEHIND_FAILING_PARSE,
    "asyncpg-flush": ASYNCPG_FLUSH,
    "copy-with-sync-and-failure": COPY_WITH_SYNC_AND_FAILURE,
    "portal-suspended-in-transaction": PORTAL_SUSPENDED_IN_TRANSACTION,
    "sync-among-data-of-a-failed-copy": SYNC_AMONG_DATA_OF_A_FAILED_COPY,
    "names-after-skipped-changes": NAMES_AFTER_SKIPPED_CHANGES,
    "parse-of-a-held-text-in-a-failed-block": PARSE_OF_A_HELD_TEXT_IN_A_FAILED_BLOCK,
    "parse-of-a-text-in-flight-in-a-failed-block": PARSE_OF_A_TEXT_IN_FLIGHT_IN_A_FAILED_BLOCK,
    "query-skipped-keeps-the-unnamed-statement": QUERY_SKIPPED_KEEPS_THE_UNNAMED_STATEMENT,
    "copy-query-in-an-error-window": COPY_QUERY_IN_AN_ERROR_WINDOW,
    "described-statement-in-an-error-window": DESCRIBED_STATEMENT_IN_AN_ERROR_WINDOW,
    "extended-copy-with-messages-behind": EXTENDED_COPY_WITH_MESSAGES_BEHIND,
    "dropped-name-parsed-again-at-once": DROPPED_NAME_PARSED_AGAIN_AT_ONCE,
    "queries-in-the-clients-error-window": QUERIES_IN_THE_CLIENTS_ERROR_WINDOW,
    "copy-data-cut-when-the-copy-fails": COPY_DATA_CUT_WHEN_THE_COPY_FAILS,
    "stand-in-behind-a-failed-execute": STAND_IN_BEHIND_A_FAILED_EXECUTE,
    "stand-in-behind-a-query-in-an-error-window": STAND_IN_BEHIND_A_QUERY_IN_AN_ERROR_WINDOW,
}

# ---------------------------------------------------------------------------------------------
# Fixtures and the tests.


@pytest.fixture(scope="module")
def scratch(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Iterator[psycopg.Connection[Any]]:
    """`diff_scratch` (no RLS, granted to the application role) and a superuser connection that
    refills it before each run."""
    with unprotected_table(pg, tenant_db, "diff_scratch", "n int PRIMARY KEY, t text NOT NULL", "SELECT, INSERT, UPDATE, DELETE"):
        admin = psycopg.connect(pg.admin_dsn(tenant_db.database), autocommit=True)
        admin.execute("SET lock_timeout = '10s'")
        yield admin
        admin.close()


def seeded(examples: int) -> settings:
    """Hypothesis settings: a fixed seed, `examples` scenarios, no shrinking (see the module docstring)."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=(Phase.generate,),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def refill(admin: psycopg.Connection[Any]) -> None:
    """Back to the two seed rows; waits (up to lock_timeout) for a rolled-back client to let go."""
    admin.execute("TRUNCATE diff_scratch")
    admin.execute(SEED_ROWS)


NOISE = Write(
    (
        step_close("S", "s1"),
        step_parse("", "SELECT 'noise'::text, $1::int"),
        step_parse("s1", "SELECT $1::int * 100"),
        step_bind("", "s1", ["7"]),
        step_execute(""),
        SYNC,
        step_query("SELECT 'noise'"),
    )
)


class OtherTenant:
    """A client of another tenant that uses the unnamed statement and the name s1 between writes;
    its replies must be what the same steps give directly."""

    def __init__(self, wire: Wire, expected: list[tuple[bytes, bytes]]) -> None:
        self.wire = wire
        self.expected = expected

    def __call__(self, _scenario_client: Wire) -> None:
        try:
            replies = self.wire.run(NOISE)
        except AssertionError as exc:
            raise AssertionError(f"the other tenant's client got no complete answer: {exc}") from None
        difference = first_difference(self.expected, replies)
        assert difference is None, f"the other tenant's client got a different answer: {difference}"


class Comparison:
    """One proxy in one pool mode, the other tenant's client, and the way to run a scenario on both
    sides: refill the table, run it directly, refill again, run it through the proxy and compare."""

    def __init__(self, mode: str, proxy: ProxyProcess, pg: EmbeddedPostgres, db: TenantDatabase, admin: psycopg.Connection[Any]):
        self.mode, self.proxy, self.pg, self.db, self.admin = mode, proxy, pg, db, admin
        noise_direct = self.direct("other tenant, direct")
        expected = noise_direct.run(NOISE)
        noise_direct.close()
        self.other = OtherTenant(connect_proxy(proxy.port, proxy.token(GLOBEX), "other tenant"), expected)

    def direct(self, name: str, **startup: str) -> Wire:
        return connect_direct(self.pg.port, self.db.app_role, self.db.app_password, self.db.database, name, **startup)

    def check(self, scenario: list[Write], **startup: str) -> None:
        """`startup`: the settings the scenario's client gives in its startup packet, on both sides."""
        refill(self.admin)
        wire = self.direct("direct", **startup)
        try:
            expected = run_direct(wire, scenario)
        finally:
            wire.close()
        refill(self.admin)
        wire = connect_proxy(self.proxy.port, self.proxy.token(ACME), **startup)
        try:
            run_and_compare(wire, scenario, expected, Transcript(self.mode), between_writes=self.other)
        finally:
            wire.close()


@pytest.fixture(params=list(MODES))
def comparison(
    request: pytest.FixtureRequest, make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase,
    scratch: psycopg.Connection[Any],
) -> Iterator[Comparison]:
    proxy: ProxyProcess = make_proxy(MODES[request.param])
    comparison = Comparison(request.param, proxy, pg, tenant_db, scratch)
    yield comparison
    comparison.other.wire.close()
    assert proxy.alive()


@pytest.mark.parametrize("scenario", list(INPUTS.values()), ids=list(INPUTS))
def test_input_answers_as_directly(comparison: Comparison, scenario: list[Write]) -> None:
    comparison.check(scenario)


def test_inputs_of_a_client_with_startup_settings_answer_as_directly(comparison: Comparison) -> None:
    """STARTUP_INPUTS, one after the other on one proxy (each input costs a proxy process otherwise)."""
    for scenario in STARTUP_INPUTS.values():
        comparison.check(scenario, **STARTUP)


def test_random_message_sequences_answer_as_directly(comparison: Comparison) -> None:
    @seeded(EXAMPLES_PER_MODE)
    @given(scenarios)
    def check(scenario: list[Write]) -> None:
        comparison.check(scenario)

    check()


def test_two_direct_sessions_answer_alike(pg: EmbeddedPostgres, tenant_db: TenantDatabase, scratch: psycopg.Connection[Any]) -> None:
    """The harness itself: a second direct session gives the same streams as the first for the same
    scenarios, so a difference through the proxy is the proxy's, not the harness's."""

    def direct(name: str) -> Wire:
        return connect_direct(pg.port, tenant_db.app_role, tenant_db.app_password, tenant_db.database, name)

    @seeded(30)
    @given(scenarios)
    def check(scenario: list[Write]) -> None:
        refill(scratch)
        first = direct("first direct session")
        try:
            expected = run_direct(first, scenario)
        finally:
            first.close()
        refill(scratch)
        second = direct("second direct session")
        try:
            run_and_compare(second, scenario, expected, Transcript("none (direct)"))
        finally:
            second.close()

    check()
