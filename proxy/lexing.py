"""Settings that change how Postgres splits SQL text into tokens, and the values of them the proxy refuses.

The SQL guard reads every statement the way Postgres lexes it with `standard_conforming_strings = on`
and a client encoding in which every byte below 0x80 is an ASCII character. Two settings break that:

- `standard_conforming_strings = off` makes a backslash escape the next character in '...' strings, so
  `SELECT 'a\\'  ,'  ; SET ROLE x; --'` is a SELECT of two strings to the guard, and to the server a
  SELECT of one string followed by SET ROLE;
- the client-only encodings whose multi-byte characters can carry 0x5C (backslash) or another ASCII
  byte as a trailing byte (SJIS, SHIFT_JIS_2004, BIG5, GBK, GB18030, JOHAB, and their aliases), so a
  quote or backslash the guard sees may be half of a character to the server.

The proxy refuses these values (at startup and in SQL; the relay can check the server's ParameterStatus
reports with `lexing_problem` too) rather than reading the text as the server would. Source: Postgres documentation, "String Constants" (4.1.2.1),
"Character Set Support" (24.3, the client-only encodings), and src/common/encnames.c for the aliases.
"""

from __future__ import annotations

import re

from proxy.protocol import errors

SQLSTATE = errors.FEATURE_NOT_SUPPORTED

# Postgres's spellings of the encodings above after clean_encoding_name() (lower case, letters and
# digits only), from pg_encname_tbl in src/common/encnames.c.
UNREADABLE_ENCODINGS = frozenset(
    {
        "sjis", "shiftjis", "mskanji", "win932", "windows932",  # SJIS
        "shiftjis2004",  # SHIFT_JIS_2004
        "big5", "win950", "windows950",  # BIG5
        "gbk", "win936", "windows936",  # GBK
        "gb18030",
        "johab",
    }
)
_NOT_ALPHANUMERIC = re.compile(r"[^a-z0-9]")
_ENCODING_HINT = (
    "use UTF8 as the client encoding (for example PGCLIENTENCODING=UTF8); the proxy's SQL guard cannot read "
    "encodings whose characters can contain a backslash or quote byte"
)
_STRINGS_HINT = (
    "leave standard_conforming_strings on (the default since Postgres 9.1) and write backslash escapes as "
    "E'...' strings; the proxy's SQL guard reads string literals only that way"
)


def parse_bool(value: str) -> bool | None:
    """A boolean setting's value as Postgres reads it (parse_bool_with_len in src/backend/utils/adt/bool.c):
    any unique prefix of true/false/yes/no, on/off, 1/0, case-insensitive; None when it is none of these."""
    word = value.strip().lower()
    if not word:
        return None
    for spelling, meaning in (("true", True), ("false", False), ("yes", True), ("no", False)):
        if spelling.startswith(word):
            return meaning
    if len(word) >= 2 and "off".startswith(word):
        return False
    return {"on": True, "1": True, "0": False}.get(word)


def encoding_key(name: str) -> str:
    """An encoding name as Postgres compares it: lower case, letters and digits only ("Shift_JIS" -> "shiftjis")."""
    return _NOT_ALPHANUMERIC.sub("", name.lower())


def lexing_problem(name: str, value: str) -> tuple[str, str] | None:
    """(message, hint) when giving setting `name` the text `value` would make the server lex SQL in a way the
    SQL guard does not read, else None. The refusal's SQLSTATE is `SQLSTATE` (0A000). A value that is not
    clearly `on` for standard_conforming_strings counts as a problem (the server rejects what it cannot
    parse anyway)."""
    setting = name.lower()
    if setting == "standard_conforming_strings" and parse_bool(value) is not True:
        return f'standard_conforming_strings = "{value}" is not supported through pg-tenant-proxy', _STRINGS_HINT
    if setting == "client_encoding" and encoding_key(value) in UNREADABLE_ENCODINGS:
        return f'client_encoding "{value}" is not supported through pg-tenant-proxy', _ENCODING_HINT
    return None
