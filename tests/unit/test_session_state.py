"""The session state table: every legal move, every other move refused, CLOSED from anywhere."""

from __future__ import annotations

import pytest

from proxy.relay.session import TRANSITIONS, Event, IllegalMove, SessionState, State


def at(state: State) -> SessionState:
    session = SessionState()
    session.state = state
    return session


@pytest.mark.parametrize("move", sorted(TRANSITIONS, key=str), ids=lambda m: f"{m[0].name}-{m[1].name}")
def test_every_row_of_the_table(move: tuple[State, Event]) -> None:
    state, event = move
    session = at(state)
    assert session.move(event) is TRANSITIONS[move]
    assert session.state is TRANSITIONS[move]


ILLEGAL = [(s, e) for s in State for e in Event if e is not Event.CLOSED and (s, e) not in TRANSITIONS]


@pytest.mark.parametrize("move", ILLEGAL, ids=lambda m: f"{m[0].name}-{m[1].name}")
def test_moves_not_in_the_table_are_illegal(move: tuple[State, Event]) -> None:
    state, event = move
    session = at(state)
    with pytest.raises(IllegalMove, match=event.value):
        session.move(event)
    assert session.state is state  # a refused move changes nothing


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
def test_closed_from_anywhere(state: State) -> None:
    session = at(state)
    assert session.move(Event.CLOSED) is State.CLOSED
    assert session.move(Event.CLOSED) is State.CLOSED  # twice is harmless


def test_a_whole_transaction_mode_session() -> None:
    session = SessionState()
    events = [Event.STARTUP_ACCEPTED, Event.PASSWORD_RECEIVED, Event.LOGGED_IN, Event.CLIENT_DATA,
              Event.SERVER_GRANTED, Event.PREPARED, Event.RELEASED, Event.SERVER_TAKEN, Event.RELEASED]
    states = [session.move(event) for event in events]
    assert states == [State.AUTHENTICATING, State.VERIFYING, State.IDLE, State.WAITING, State.PREPARING,
                      State.ACTIVE, State.IDLE, State.ACTIVE, State.IDLE]
    assert session.logged_in()


def test_logged_in_states() -> None:
    assert {s for s in State if at(s).logged_in()} == {State.IDLE, State.WAITING, State.PREPARING, State.ACTIVE}
