"""The admin console: the virtual database `pgtenantproxy` (PgBouncer's `pgbouncer`), spoken to with psql.

Who may enter (`authorize`): a client whose token verifies and carries every `[admin] required_claims`
value, or any client of the `[admin] listen_unix` socket. What it may say (`parse_command`, pure):

    SHOW POOLS | CLIENTS | SERVERS | STATS | TENANTS | CONFIG
    PAUSE [db]   RESUME [db]   KILL TENANT 'id'   KILL CLIENT id   RELOAD

case-insensitive, with an optional trailing semicolon, one command per Query message (the simple Query
protocol, as psql sends it; the extended protocol is answered with 0A000). `Console` runs a command
against one proxy process's live state and answers with a `Result` (RowDescription, DataRows,
CommandComplete, as PgBouncer's admin console does, with the same column names where a column means
the same thing); `ConsoleSession` is one console client's message loop. Every command is written to
the audit log (`admin_command`).
"""

from __future__ import annotations

import datetime
import enum
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy import __version__
from proxy.auth.claims import lookup, satisfies
from proxy.config import ADMIN_DATABASE, SCHEMA, Settings
from proxy.logs import AUDIT
from proxy.metrics import METRICS, OTHER_TENANTS
from proxy.pool import EVERY_DATABASE
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import MessageReader
from proxy.relay.session import State

if TYPE_CHECKING:
    from proxy.backend import BackendConnection
    from proxy.client import ClientConnection
    from proxy.server import ProxyServer
    from proxy.tokens import Identity

__all__ = ["ADMIN_DATABASE", "Command", "Console", "ConsoleError", "ConsoleSession", "Operator", "Result",
           "authorize", "parse_command"]

# Type OIDs and sizes of the result columns (pg_type: int8, text).
INT8 = (20, 8)
TEXT = (25, -1)
KILL_MESSAGE = "terminating connection due to administrator command"  # Postgres's text for pg_terminate_backend
SECRET_KEY = re.compile(r"password|secret|signing_key")
_URL_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")  # scheme://user:password@host (RFC 3986, userinfo)


class ConsoleError(Exception):
    """A command refused: answered with an ErrorResponse (severity ERROR) and the session goes on."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.hint = hint


# -- who is at the console ------------------------------------------------------------------------


@dataclass(frozen=True)
class Operator:
    """Who logged in to the console: a token's `sub` and `iss`, or the admin Unix socket."""

    via: str  # "token" or "unix socket"
    sub: str | None = None
    iss: str | None = None

    @classmethod
    def from_identity(cls, identity: Identity) -> Operator:
        iss = identity.claims.get("iss")
        return cls("token", identity.subject, iss if isinstance(iss, str) else None)


LOCAL_OPERATOR = Operator("unix socket")


def authorize(claims: dict[str, Any], required: dict[str, list[Any]]) -> str | None:
    """None when verified `claims` satisfy every `[admin] required_claims` path (a value, or for an
    array claim one element, equals an accepted value), else the refusal message naming the first path
    that does not (never the values). No required claims means no token may enter."""
    if not required:
        return "the admin console accepts no token logins"
    for path, accepted in required.items():
        if not satisfies(lookup(claims, path), accepted):
            return f'token claim "{path}" does not grant access to the admin console'
    return None


def refusal_hint(required: dict[str, list[Any]]) -> str:
    """The hint sent with an `authorize` refusal: which way into the console this proxy has."""
    if not required:
        return "this proxy opens its admin console only on the admin socket ([admin] listen_unix), without a token"
    return "log in to the admin console with a token that carries the required claims"


# -- commands -------------------------------------------------------------------------------------


class Verb(enum.Enum):
    SHOW = "SHOW"
    PAUSE = "PAUSE"
    RESUME = "RESUME"
    KILL_TENANT = "KILL TENANT"
    KILL_CLIENT = "KILL CLIENT"
    RELOAD = "RELOAD"


SHOW_TOPICS = ("POOLS", "CLIENTS", "SERVERS", "STATS", "TENANTS", "CONFIG")
COMMANDS_HINT = ("commands: " + ", ".join(f"SHOW {topic}" for topic in SHOW_TOPICS)
                 + ", PAUSE [db], RESUME [db], KILL TENANT 'id', KILL CLIENT id, RELOAD")
_TOKEN = re.compile(r"""\s*(?:'(?P<literal>(?:[^']|'')*)'|"(?P<quoted>(?:[^"]|"")*)"|(?P<word>[^\s'"]+))""")


@dataclass(frozen=True)
class Command:
    """A parsed console command: its verb and its one argument (a SHOW topic, a database name, a
    tenant id or a client id), if any."""

    verb: Verb
    argument: str | None = None


@dataclass(frozen=True)
class Word:
    """A token of a command: its text and whether it was quoted ('literal' or "identifier")."""

    text: str
    quoted: bool


def _words(text: str) -> list[Word]:
    """The command's tokens; raises ConsoleError 42601 for an unterminated quote."""
    words: list[Word] = []
    position, end = 0, len(text)
    while position < end:
        match = _TOKEN.match(text, position)
        if match is None:
            if text[position:].strip():
                raise ConsoleError(errors.SYNTAX_ERROR, "unterminated quoted string", COMMANDS_HINT)
            break
        if match["literal"] is not None:
            words.append(Word(match["literal"].replace("''", "'"), True))
        elif match["quoted"] is not None:
            words.append(Word(match["quoted"].replace('""', '"'), True))
        else:
            words.append(Word(match["word"], False))
        position = match.end()
    return words


def parse_command(text: str) -> Command:
    """One console command from a Query's text (see the module docstring); raises ConsoleError 42601
    (syntax_error) with the list of commands as a hint for anything else. Unquoted database names are
    folded to lower case, as Postgres folds identifiers; tenant ids are taken as written."""
    words = _words(text.strip().rstrip(";").rstrip())
    keywords = [word.text.upper() if not word.quoted else None for word in words]
    if keywords[:1] == ["SHOW"] and len(words) == 2 and keywords[1] in SHOW_TOPICS:
        return Command(Verb.SHOW, keywords[1])
    if keywords[:1] in (["PAUSE"], ["RESUME"]) and len(words) <= 2:
        verb = Verb.PAUSE if keywords[0] == "PAUSE" else Verb.RESUME
        if len(words) == 1:
            return Command(verb)
        name = words[1]
        return Command(verb, name.text if name.quoted else name.text.lower())
    if keywords[:2] == ["KILL", "TENANT"] and len(words) == 3:
        return Command(Verb.KILL_TENANT, words[2].text)
    if keywords[:2] == ["KILL", "CLIENT"] and len(words) == 3 and words[2].text.isdigit():
        return Command(Verb.KILL_CLIENT, words[2].text)
    if keywords == ["RELOAD"]:
        return Command(Verb.RELOAD)
    shown = " ".join(word.text for word in words[:3])[:60]
    raise ConsoleError(errors.SYNTAX_ERROR, f'unknown admin console command "{shown}"', COMMANDS_HINT)


# -- result sets ----------------------------------------------------------------------------------

Value = str | int | None


@dataclass(frozen=True)
class Result:
    """A command's answer: named, typed columns and their rows (SHOW), or only a command tag with
    notices (the other commands)."""

    tag: str
    columns: Sequence[tuple[str, tuple[int, int]]] = ()
    rows: Sequence[Sequence[Value]] = ()
    notices: Sequence[str] = ()

    def encode(self) -> bytes:
        """The messages that answer the Query: NoticeResponse*, then RowDescription and DataRow* for a
        result set, then CommandComplete (without the ReadyForQuery)."""
        parts = [messages.notice_response("00000", notice) for notice in self.notices]
        if self.columns:
            parts.append(messages.row_description([(name, *kind) for name, kind in self.columns]))
            parts += [messages.data_row([_text(value) for value in row]) for row in self.rows]
        parts.append(messages.command_complete(self.tag))
        return b"".join(parts)


def _text(value: Value) -> str | None:
    return value if value is None or isinstance(value, str) else str(value)


def _table(columns: str, rows: Iterable[Sequence[Value]]) -> Result:
    """A SHOW result from space-separated column names; a name ending in `#` is an int8 column."""
    typed = [(name.rstrip("#"), INT8 if name.endswith("#") else TEXT) for name in columns.split()]
    return Result("SHOW", typed, list(rows))


def _timestamp(epoch: float) -> str:
    """A wall-clock time as PgBouncer prints it: `2026-11-29 14:00:00 UTC`."""
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds_and_micros(seconds: float) -> tuple[int, int]:
    """PgBouncer's split of a duration into whole seconds and the microseconds after them."""
    whole = int(seconds)
    return whole, int((seconds - whole) * 1_000_000)


def config_rows(settings: Settings) -> list[tuple[str, str, str]]:
    """SHOW CONFIG: (key, value, default) for every configuration key, as loaded (file and PGTP_*
    environment). A secret (password, JWT secret, signing key) shows `<set>` or an empty string,
    never its value; the default of a secret is always empty."""
    rows = []
    for (section, key), (_, default) in SCHEMA.items():
        name = f"{section}.{key}" if section else key
        value = settings.values.get((section, key), default)
        if _secret(key):
            rows.append((name, "<set>" if value else "", ""))
        else:
            rows.append((name, _config_text(_masked(value)), _config_text(default)))
    return rows


def _secret(key: str) -> bool:
    """Whether a key (at any depth) holds a secret itself, not the path of a file holding one."""
    return SECRET_KEY.search(key) is not None and not key.endswith("_file")


def _masked(value: Any) -> Any:
    """`value` with the secrets inside it replaced by `<set>`: the value of a secret key at any depth of
    a table or list (the passwords of `[roles.map]`), and the password in a URL's user part."""
    if isinstance(value, dict):
        return {key: "<set>" if _secret(str(key)) else _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1:<set>@", value)
    return value


def _config_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


class TenantLedger:
    """Totals per tenant of the sessions that ended (transactions, bytes received and sent), for SHOW
    TENANTS; at most `max_tenants` tenants are kept apart, later ones are summed under `_other`, so a
    flood of tenants cannot grow it without bound."""

    def __init__(self, max_tenants: int) -> None:
        self.max_tenants = max_tenants
        self.totals: dict[str, list[int]] = {}  # tenant -> [sessions, transactions, received, sent]

    def add(self, tenant: str, transactions: int, received: int, sent: int) -> None:
        if tenant not in self.totals and len(self.totals) >= self.max_tenants:
            tenant = OTHER_TENANTS
        total = self.totals.setdefault(tenant, [0, 0, 0, 0])
        total[0] += 1
        total[1] += transactions
        total[2] += received
        total[3] += sent


# -- running commands against a live proxy ---------------------------------------------------------


@dataclass
class PoolRow:
    """One line of SHOW POOLS while it is being counted."""

    cl_active: int = 0
    cl_waiting: int = 0
    sv_active: int = 0


@dataclass
class TenantRow(PoolRow):
    """One line of SHOW TENANTS while it is being counted: live clients plus the ledger's totals."""

    totals: list[int] = field(default_factory=lambda: [0, 0, 0, 0])


def _count_client(row: PoolRow, client: ClientConnection) -> None:
    """Count a logged-in client: waiting for a server connection, or active (holding one or idle, as
    PgBouncer's cl_active counts), and the server connection it holds."""
    if client.session.state is State.WAITING:
        row.cl_waiting += 1
    else:
        row.cl_active += 1
    row.sv_active += client.backend is not None


class Console:
    """The commands, run against one proxy process (`ProxyServer`); with `workers = N` each worker's
    console sees its own process."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.ledger = TenantLedger(server.settings.admin.max_tenants)

    def session_ended(self, client: ClientConnection) -> None:
        """A tenant's client left: its numbers go to the ledger."""
        if client.identity is not None:
            self.ledger.add(client.identity.tenant, client.transactions, client.bytes_in, client.bytes_out)

    def run(self, command: Command) -> Result:
        """Run a command; raises ConsoleError."""
        if command.verb is Verb.SHOW:
            shows: dict[str | None, Callable[[], Result]] = {
                "POOLS": self.show_pools, "CLIENTS": self.show_clients, "SERVERS": self.show_servers,
                "STATS": self.show_stats, "TENANTS": self.show_tenants, "CONFIG": self.show_config}
            return shows[command.argument]()
        if command.verb is Verb.PAUSE:
            return self.pause(command.argument)
        if command.verb is Verb.RESUME:
            return self.resume(command.argument)
        if command.verb is Verb.KILL_TENANT:
            return self.kill_tenant(command.argument or "")
        if command.verb is Verb.KILL_CLIENT:
            return self.kill_client(int(command.argument or 0))
        return self.reload()

    def _clients(self) -> list[ClientConnection]:
        return sorted(self.server.clients, key=lambda client: client.id)

    def _tenant_clients(self) -> list[ClientConnection]:
        """Logged-in clients of tenants (not consoles, not logins in progress)."""
        return [c for c in self._clients() if c.identity is not None and c.session.logged_in()]

    def _databases(self) -> list[str]:
        """Every database a pool serves or may serve: the configured ones and those with connections."""
        upstream = self.server.settings.upstream
        names = {name for name in [upstream.database, *(upstream.databases or [])] if name}
        names.update(client.database for client in self._tenant_clients())
        names.update(backend.pool_key[0] for pool in self.server.pools.every() for backend in pool.servers)
        return sorted(names)

    def show_pools(self) -> Result:
        """One row per database and login role ([roles]): clients active and waiting, server connections
        by state, the longest wait, the pool mode and whether it is paused."""
        settings = self.server.settings
        table = []
        for pool in self.server.pools.every():
            rows: dict[str, PoolRow] = {name: PoolRow() for name in self._databases()}
            for client in self._tenant_clients():
                if client.pool is pool:
                    _count_client(rows.setdefault(client.database, PoolRow()), client)
            open_, idle, _ = pool.counts()
            for name, row in rows.items():
                login = max(0, open_.get(name, 0) - idle.get(name, 0) - row.sv_active)
                wait, wait_us = _seconds_and_micros(pool.oldest_wait(name))
                table.append((name, pool.upstream.user, row.cl_active, row.cl_waiting, row.sv_active,
                              idle.get(name, 0), 0, login, wait, wait_us, settings.pool.mode,
                              int(pool.is_paused(name))))
        return _table("database user cl_active# cl_waiting# sv_active# sv_idle# sv_used# sv_login# maxwait# "
                      "maxwait_us# pool_mode paused#", table)

    def show_clients(self) -> Result:
        """One row per client connection of this process, consoles and logins in progress included."""
        loop_now = self.server.pool.loop.time()
        table = []
        for client in self._clients():
            identity, request = client.identity, client.request
            waiting = client.waiting_since
            wait, wait_us = _seconds_and_micros(loop_now - waiting if waiting is not None else 0.0)
            address, _, port = client.address.rpartition(":")
            database: str | None
            if client.console is not None:
                database, sub = ADMIN_DATABASE, client.console.operator.sub
            else:
                database = client.database if request is not None else None
                sub = identity.subject if identity is not None else None
            tls = client.transport is not None and client.transport.get_extra_info("ssl_object") is not None
            table.append((
                client.id, "C", request.user if request else None, database, identity.tenant if identity else None,
                sub, client.session.state.value, address or client.address, int(port) if port.isdigit() else None,
                _timestamp(client.connected_at), wait, wait_us,
                client.backend.process_id if client.backend is not None else None,
                "yes" if tls else "no", request.forwarded.get("application_name") if request else None,
                client.transactions, client.bytes_in, client.bytes_out,
            ))
        return _table("id# type user database tenant sub state addr port# connect_time wait# wait_us# remote_pid# "
                      "tls application_name xact_count# bytes_received# bytes_sent#", table)

    def show_servers(self) -> Result:
        """One row per open server connection: its state, its backend pid, and the client (and tenant)
        holding it, if any."""
        settings, loop_now, now = self.server.settings, self.server.pool.loop.time(), time.time()
        holders = {client.backend: client for client in self._clients() if client.backend is not None}
        table = []
        backends: list[tuple[BackendConnection, str]] = sorted(
            ((backend, pool.upstream.user) for pool in self.server.pools.every() for backend in pool.servers),
            key=lambda pair: pair[0].opened_at)
        for backend, user in backends:
            holder = holders.get(backend)
            table.append((
                "S", user, backend.pool_key[0], backend.lifecycle.value, settings.upstream.host,
                settings.upstream.port, _timestamp(now - (loop_now - backend.opened_at)), backend.process_id,
                holder.id if holder is not None else None,
                holder.identity.tenant if holder is not None and holder.identity is not None else None,
                backend.state.tenant,
            ))
        return _table("type user database state addr port# connect_time remote_pid# link# tenant last_tenant", table)

    def show_stats(self) -> Result:
        """This process's totals since it started (one row; the counters of /metrics)."""
        logins = sum(count for (result, _), count in METRICS.auth.items() if result == "ok")
        refused = sum(count for (result, _), count in METRICS.auth.items() if result == "refused")
        row = ("*", METRICS.transactions, METRICS.queries, METRICS.bytes_received, METRICS.bytes_sent,
               int(METRICS.checkout_wait_sum * 1_000_000), logins, refused, METRICS.context_sets,
               METRICS.tenant_switches, sum(METRICS.guard_refusals.values()))
        return _table("database total_xact_count# total_query_count# total_received# total_sent# total_wait_time# "
                      "total_login_count# total_login_refused# total_context_sets# total_tenant_switches# "
                      "total_guard_refusals#", [row])

    def show_tenants(self) -> Result:
        """One row per tenant with live clients or ended sessions: clients, server connections held,
        and sessions, transactions and bytes (ended sessions plus live ones)."""
        rows: dict[str, TenantRow] = {tenant: TenantRow(totals=list(totals))
                                      for tenant, totals in self.ledger.totals.items()}
        for client in self._tenant_clients():
            assert client.identity is not None
            row = rows.setdefault(client.identity.tenant, TenantRow())
            _count_client(row, client)
            for index, value in enumerate((1, client.transactions, client.bytes_in, client.bytes_out)):
                row.totals[index] += value
        table: list[list[Value]] = [[tenant, row.cl_active, row.cl_waiting, row.sv_active, *row.totals]
                                    for tenant, row in sorted(rows.items())]
        return _table("tenant cl_active# cl_waiting# sv_active# sessions# xact_count# bytes_received# bytes_sent#",
                      table)

    def show_config(self) -> Result:
        return _table("key value default", config_rows(self.server.settings))

    def _pool_database(self, name: str | None) -> str:
        """A database PAUSE / RESUME may name (one the configuration lets clients reach), or every
        database for None; raises ConsoleError 3D000."""
        if name is None:
            return EVERY_DATABASE
        if name not in self._databases():
            raise ConsoleError(errors.INVALID_CATALOG_NAME, f'no pool for database "{name}"',
                               "name a database of [upstream] database / databases (see SHOW POOLS)")
        return name

    def pause(self, name: str | None) -> Result:
        database = self._pool_database(name)
        for pool in self.server.pools.every():
            pool.pause(database)
        return Result("PAUSE")

    def resume(self, name: str | None) -> Result:
        database, pool = self._pool_database(name), self.server.pool
        if EVERY_DATABASE in pool.paused and database != EVERY_DATABASE:
            raise ConsoleError(errors.OBJECT_NOT_IN_PREREQUISITE_STATE, "every database is paused",
                               "RESUME without a name resumes them all")
        if not pool.paused:
            raise ConsoleError(errors.OBJECT_NOT_IN_PREREQUISITE_STATE, "nothing is paused")
        if database != EVERY_DATABASE and database not in pool.paused:  # RESUME alone resumes every pause
            raise ConsoleError(errors.OBJECT_NOT_IN_PREREQUISITE_STATE, f'database "{database}" is not paused')
        for each in self.server.pools.every():
            each.resume(database)
        return Result("RESUME")

    def kill_tenant(self, tenant: str) -> Result:
        """End every client of `tenant` with 57P01, closing the server connections they hold. Like
        PgBouncer's KILL, later logins of the tenant are not refused."""
        victims = [c for c in self._clients() if c.identity is not None and c.identity.tenant == tenant]
        for client in victims:
            client.terminate(errors.ADMIN_SHUTDOWN, KILL_MESSAGE, routine=errors.INTERRUPTS)
        return Result("KILL", notices=[f"{len(victims)} client connection(s) of tenant {tenant!r} ended"])

    def kill_client(self, client_id: int) -> Result:
        for client in self._clients():
            if client.id == client_id:
                client.terminate(errors.ADMIN_SHUTDOWN, KILL_MESSAGE, routine=errors.INTERRUPTS)
                return Result("KILL")
        raise ConsoleError(errors.UNDEFINED_OBJECT, f"no client with id {client_id}", "see SHOW CLIENTS")

    def reload(self) -> Result:
        """Send SIGHUP to the process that owns the configuration: the supervisor with `workers = N`,
        else this process."""
        os.kill(os.getppid() if self.server.worker is not None else os.getpid(), signal.SIGHUP)
        return Result("RELOAD")


# -- one console client ---------------------------------------------------------------------------

EXTENDED = frozenset(b"PBDECH")  # Parse, Bind, Describe, Execute, Close, Flush: refused until Sync


class ConsoleSession:
    """One console client after its login: reads its messages and answers them. `write` sends bytes to
    the client; `close` ends the connection (after Terminate)."""

    def __init__(self, console: Console, operator: Operator, client: str, user: str,
                 write: Callable[[bytes], None], close: Callable[[], None], max_message: int) -> None:
        self.console = console
        self.operator = operator
        self.client = client
        self.user = user
        self.write = write
        self.close = close
        self._reader = MessageReader(max_message)
        self._failed = False  # an extended-protocol message was refused: skip until Sync

    def greeting(self) -> bytes:
        """AuthenticationOk, the ParameterStatus values psql reads, and ReadyForQuery."""
        parameters = {"server_version": f"{__version__}/pgtenantproxy", "server_encoding": "UTF8",
                      "client_encoding": "UTF8", "DateStyle": "ISO", "integer_datetimes": "on",
                      "standard_conforming_strings": "on"}
        return b"".join([messages.authentication(messages.AUTH_OK),
                         *(messages.parameter_status(name, value) for name, value in parameters.items()),
                         messages.ready_for_query(b"I")])

    def data_received(self, data: bytes) -> None:
        """Answer every whole message received; raises ProtocolViolation (08P01) for a message no
        frontend sends after login."""
        self._reader.feed(data)
        for type_byte, body in self._reader:
            if type_byte == b"Q":
                self.write(self.answer(messages.parse_cstring(body)) + messages.ready_for_query(b"I"))
            elif type_byte == b"X":
                self.close()
                return
            elif type_byte == b"S":
                self._failed = False
                self.write(messages.ready_for_query(b"I"))
            elif type_byte[0] in EXTENDED:
                self._refuse_extended()
            elif type_byte == b"F":
                self.write(_extended_error() + messages.ready_for_query(b"I"))
            else:
                raise ProtocolViolation(f"unexpected message type {type_byte!r} on the admin console")

    def _refuse_extended(self) -> None:
        if not self._failed:
            self._failed = True
            self.write(_extended_error())

    def answer(self, text: str) -> bytes:
        """The reply to one Query (without ReadyForQuery); the command and its outcome are audited."""
        if not text.strip().rstrip(";").strip():
            return messages.empty_query_response()
        try:
            reply = self.console.run(parse_command(text)).encode()
            outcome = "ok"
        except ConsoleError as exc:
            reply = messages.error_response("ERROR", exc.sqlstate, str(exc), hint=exc.hint)
            outcome = str(exc)
        AUDIT.admin_command(client=self.client, user=self.user, via=self.operator.via, sub=self.operator.sub,
                            iss=self.operator.iss, command=text, result=outcome)
        return reply


def _extended_error() -> bytes:
    return messages.error_response("ERROR", errors.FEATURE_NOT_SUPPORTED,
                                   "the admin console speaks only the simple Query protocol",
                                   hint="use psql, or send the command as a simple Query")
