"""proxy.cancels: the keys of sessions that ended mid-statement, on a fake clock."""

from __future__ import annotations

import pytest

from proxy import cancels
from proxy.cancels import GRACE_SECONDS, AbandonedStatements


def test_a_key_finds_its_backend_until_the_grace_period_ends() -> None:
    keys = AbandonedStatements()
    keys.remember(1001, -5, 4242, 77, now=100.0)
    found = keys.find(1001, -5, now=100.0 + GRACE_SECONDS - 0.001)
    assert found is not None and (found.process_id, found.secret_key) == (4242, 77)
    assert keys.find(1001, -5, now=100.0 + GRACE_SECONDS) is None


def test_a_wrong_secret_or_an_unknown_key_finds_nothing() -> None:
    keys = AbandonedStatements()
    keys.remember(1001, -5, 4242, 77, now=0.0)
    assert keys.find(1001, 5, now=1.0) is None
    assert keys.find(1002, -5, now=1.0) is None
    assert keys.find(1001, -5, now=1.0) is not None  # a wrong secret does not spend the key


def test_a_key_minted_again_stands_for_its_latest_session() -> None:
    keys = AbandonedStatements()
    keys.remember(1001, 1, 10, 11, now=0.0)
    keys.remember(1001, 2, 20, 21, now=5.0)
    assert keys.find(1001, 1, now=6.0) is None
    found = keys.find(1001, 2, now=GRACE_SECONDS + 1.0)  # kept from its own time, not the first one's
    assert found is not None and found.process_id == 20


def test_at_most_max_keys_are_kept_the_oldest_going_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cancels, "MAX_KEYS", 3)
    keys = AbandonedStatements()
    for key in range(5):
        keys.remember(key, 0, 100 + key, 0, now=float(key))
    assert [keys.find(key, 0, now=5.0) is not None for key in range(5)] == [False, False, True, True, True]
