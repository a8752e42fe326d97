"""The base of the enums the hot path looks up in tables and sets: members hash by identity.

`enum.Enum.__hash__` is Python code (it hashes the member's name); every table lookup keyed by a
member, such as the session's transition table, pays a Python call per member. Members are singletons,
so the object's own identity hash, computed in C, is equal for equal members and is what they use here.
"""

from __future__ import annotations

import enum


class HotEnum(enum.Enum):
    """An Enum whose members hash by identity (see the module docstring)."""

    __hash__ = object.__hash__
