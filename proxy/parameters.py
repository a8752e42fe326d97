"""Client startup parameters: what a StartupMessage may ask for, and what is forwarded upstream.

The `options` parameter is split as the server splits it, and each `-c name=value` or `--name=value`
inside it is judged like a startup parameter of its own. Nothing reaches the upstream server that is
not on the allowlist; protected settings and replication are refused with a reason, and so are values
that change how the server lexes SQL (`proxy.lexing`: standard_conforming_strings off, client encodings
the SQL guard cannot read), with SQLSTATE 0A000.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy import lexing
from proxy.protocol import errors


class ParameterRefused(Exception):
    """A startup parameter the proxy will not forward; the message names it and says why, the hint (when
    there is one) what to do instead."""

    def __init__(self, text: str, sqlstate: str = errors.INSUFFICIENT_PRIVILEGE, hint: str | None = None) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.hint = hint


@dataclass
class StartupRequest:
    """The parts of a StartupMessage the proxy acts on."""

    user: str
    database: str | None
    forwarded: dict[str, str] = field(default_factory=dict)
    unrecognized_protocol_options: list[str] = field(default_factory=list)


def split_options(options: str) -> list[str]:
    """Split the `options` string on whitespace, with backslash escaping the next character."""
    words: list[str] = []
    current: list[str] = []
    in_word = False
    escaped = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = in_word = True
        elif char.isspace():
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(char)
            in_word = True
    if escaped:
        raise ParameterRefused("startup option string ends with a lone backslash", errors.PROTOCOL_VIOLATION)
    if in_word:
        words.append("".join(current))
    return words


def _name_value(assignment: str) -> tuple[str, str]:
    name, sep, value = assignment.partition("=")
    if not sep or not name:
        raise ParameterRefused(f'startup option "{assignment}" requires a value (name=value)', errors.PROTOCOL_VIOLATION)
    return name.replace("-", "_"), value


def option_settings(options: str) -> list[tuple[str, str]]:
    """The settings named by `-c name=value`, `-cname=value` and `--name=value` in an options string."""
    words = split_options(options)
    settings: list[tuple[str, str]] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-c":
            if index + 1 == len(words):
                raise ParameterRefused('startup option "-c" requires a value', errors.PROTOCOL_VIOLATION)
            settings.append(_name_value(words[index + 1]))
            index += 2
            continue
        if word.startswith("-c"):
            settings.append(_name_value(word[2:]))
        elif word.startswith("--"):
            settings.append(_name_value(word[2:]))
        else:
            raise ParameterRefused(f'startup option "{word}" is not supported; only -c name=value is')
        index += 1
    return settings


class ProtectedSettings:
    """The settings no client may write: the tenant setting, the proof, and names under the prefixes."""

    def __init__(self, names: Iterable[str], prefixes: Iterable[str]) -> None:
        self._names = {name.lower() for name in names}
        self._prefixes = tuple(prefix.lower() for prefix in prefixes)

    def __contains__(self, name: str) -> bool:
        lowered = name.lower()
        return lowered in self._names or lowered.startswith(self._prefixes)


class ParameterPolicy:
    """Decides which startup parameters pass, from an allowlist and the protected settings."""

    def __init__(self, allowed: Iterable[str], protected: ProtectedSettings) -> None:
        self._allowed = {name.lower(): name for name in allowed}
        self.protected = protected

    def _check(self, name: str, value: str) -> None:
        if name in self.protected:
            raise ParameterRefused(f'setting "{name}" is protected: the proxy sets it from your token')
        if name.lower() not in self._allowed:
            raise ParameterRefused(
                f'startup parameter "{name}" is not allowed through the proxy',
            )
        problem = lexing.lexing_problem(name, value)
        if problem is not None:
            raise ParameterRefused(problem[0], lexing.SQLSTATE, hint=problem[1])

    def evaluate(self, parameters: dict[str, str]) -> StartupRequest:
        """Judge a StartupMessage's parameters; raise ParameterRefused for the first one refused (42501 for
        a protected or unlisted setting, 0A000 for a value the SQL guard cannot read, 08P01 for a malformed
        `options` string)."""
        user = parameters.get("user", "")
        if not user:
            raise ParameterRefused('no "user" given in the startup packet', errors.INVALID_AUTHORIZATION)
        request = StartupRequest(user=user, database=parameters.get("database") or None)
        for name, value in parameters.items():
            if name in ("user", "database"):
                continue
            if name == "replication":
                raise ParameterRefused("replication connections are not supported through the proxy")
            if name.startswith("_pq_."):
                request.unrecognized_protocol_options.append(name)
            elif name == "options":
                for option, option_value in option_settings(value):
                    self._check(option, option_value)
                    request.forwarded[option] = option_value
            else:
                self._check(name, value)
                request.forwarded[name] = value
        return request
