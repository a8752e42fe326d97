"""The client session's states and every legal move between them. Everything that changes a session's
state goes through `SessionState.move`, and this file holds the whole table.

    STARTUP --TLS_REQUESTED--> TLS_HANDSHAKE --TLS_DONE--> STARTUP
    STARTUP --CANCEL_REQUESTED--> CANCELLING (open until the cancel was acted on, then closed)
    STARTUP --STARTUP_ACCEPTED--> AUTHENTICATING --PASSWORD_RECEIVED--> VERIFYING
    VERIFYING --LOGGED_IN--> IDLE          (no server connection held)
    VERIFYING --SERVER_GRANTED--> PREPARING (the first client of a pool: context / settings at login)
    IDLE --CLIENT_DATA--> WAITING --SERVER_GRANTED--> PREPARING --PREPARED--> ACTIVE
    IDLE / WAITING --SERVER_TAKEN--> ACTIVE (nothing to wait for before the client's messages)
    ACTIVE --RELEASED--> IDLE              (transaction mode, at ReadyForQuery 'I' with nothing owed)
    any --CLOSED--> CLOSED

A move not in the table is a bug in the proxy: `IllegalMove`, and the session ends with XX000 rather
than drifting into a silent desync.
"""

from __future__ import annotations

from proxy.relay.enums import HotEnum


class State(HotEnum):
    STARTUP = "startup"  # waiting for SSLRequest / CancelRequest / StartupMessage
    TLS_HANDSHAKE = "tls handshake"
    CANCELLING = "cancelling"  # a CancelRequest was read; the connection closes once the cancel was acted on
    AUTHENTICATING = "authenticating"  # waiting for the PasswordMessage carrying the token
    VERIFYING = "verifying"  # token being verified (and, for the first client of a pool, a server set up)
    IDLE = "idle"  # logged in, holding no server connection
    WAITING = "waiting"  # the client sent something; waiting for the pool to grant a server connection
    PREPARING = "preparing"  # a server connection granted; the proxy's own exchange runs before the client's
    ACTIVE = "active"  # forwarding between the client and its server connection
    CLOSED = "closed"


class Event(HotEnum):
    TLS_REQUESTED = "tls requested"
    TLS_DONE = "tls done"
    CANCEL_REQUESTED = "cancel requested"
    STARTUP_ACCEPTED = "startup accepted"
    PASSWORD_RECEIVED = "password received"
    LOGGED_IN = "logged in"
    CLIENT_DATA = "client data"
    SERVER_GRANTED = "server granted"
    SERVER_TAKEN = "server taken"
    PREPARED = "prepared"
    RELEASED = "released"
    CLOSED = "closed"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.STARTUP, Event.TLS_REQUESTED): State.TLS_HANDSHAKE,
    (State.TLS_HANDSHAKE, Event.TLS_DONE): State.STARTUP,
    (State.STARTUP, Event.CANCEL_REQUESTED): State.CANCELLING,
    (State.STARTUP, Event.STARTUP_ACCEPTED): State.AUTHENTICATING,
    (State.AUTHENTICATING, Event.PASSWORD_RECEIVED): State.VERIFYING,
    (State.VERIFYING, Event.LOGGED_IN): State.IDLE,
    (State.VERIFYING, Event.SERVER_GRANTED): State.PREPARING,
    (State.IDLE, Event.CLIENT_DATA): State.WAITING,
    (State.IDLE, Event.SERVER_TAKEN): State.ACTIVE,
    (State.IDLE, Event.SERVER_GRANTED): State.PREPARING,
    (State.WAITING, Event.SERVER_TAKEN): State.ACTIVE,
    (State.WAITING, Event.SERVER_GRANTED): State.PREPARING,
    (State.PREPARING, Event.PREPARED): State.ACTIVE,
    (State.ACTIVE, Event.RELEASED): State.IDLE,
    **{(state, Event.CLOSED): State.CLOSED for state in State},  # from anywhere, closing twice included
}


def _by_event(table: dict[tuple[State, Event], State]) -> dict[Event, dict[State, State]]:
    """`table` by event, then state: a move is then two lookups keyed by single members (hashed by
    identity), with no (state, event) tuple built and hashed for it (three moves per transaction in
    transaction mode)."""
    moves: dict[Event, dict[State, State]] = {}
    for (state, event), to in table.items():
        moves.setdefault(event, {})[state] = to
    return moves


_BY_EVENT = _by_event(TRANSITIONS)


class IllegalMove(Exception):
    """A move the table does not allow: a bug in the proxy, reported to the client as XX000."""


class SessionState:
    """One session's state; `move` is the only way to change it."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = State.STARTUP

    def move(self, event: Event) -> State:
        """Apply `event`; raises IllegalMove when the table has no such move. CLOSED is reachable from
        every state, and closing twice is harmless."""
        try:
            self.state = _BY_EVENT[event][self.state]
        except KeyError:
            raise IllegalMove(f"no move {event.value!r} from state {self.state.value!r}") from None
        return self.state

    def logged_in(self) -> bool:
        return self.state in (State.IDLE, State.WAITING, State.PREPARING, State.ACTIVE)
