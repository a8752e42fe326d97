"""The base of the enums the hot path looks up in tables and sets: members hash by identity.

`enum.Enum.__hash__` is Python code (it hashes the member's name); every table lookup keyed by a
member, such as the session's transition table, pays a Python call per member. Members are singletons,
so the object's own identity hash, computed in C, is equal for equal members and is what they use here.

Looking a member up on its class is slow too on Python 3.11: `enum.EnumType` defines `__getattr__`, so
every `State.IDLE` runs through a Python-level attribute hook (about 80 ns, against 6 ns for a global;
3.12 dropped that `__getattr__`). Code that runs for every message or transaction binds the members it
compares against to module globals once (`_CLOSED = Lifecycle.CLOSED`).
"""

from __future__ import annotations

import enum


class HotEnum(enum.Enum):
    """An Enum whose members hash by identity (see the module docstring)."""

    __hash__ = object.__hash__
