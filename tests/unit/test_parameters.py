"""Startup parameter policy: options parsing, allowlist, protected settings, replication."""

import pytest

from proxy import lexing
from proxy.config import DEFAULT_ALLOWED_PARAMETERS
from proxy.parameters import ParameterPolicy, ParameterRefused, ProtectedSettings, option_settings, split_options
from proxy.protocol import errors


def policy() -> ParameterPolicy:
    protected = ProtectedSettings(["app.current_tenant", "tenant_proxy.proof"], ["app.", "request.jwt."])
    return ParameterPolicy(DEFAULT_ALLOWED_PARAMETERS, protected)


def test_split_options_with_escapes() -> None:
    assert split_options(r"-c  search_path=a\ b   -c x=1") == ["-c", "search_path=a b", "-c", "x=1"]
    assert split_options("") == []


@pytest.mark.parametrize(
    "options, expected",
    [
        ("-c search_path=public", [("search_path", "public")]),
        ("-csearch_path=public", [("search_path", "public")]),
        ("--search-path=public", [("search_path", "public")]),
        ("-c a=1 --b=2", [("a", "1"), ("b", "2")]),
        ("-c a=", [("a", "")]),
    ],
)
def test_option_settings(options: str, expected: list[tuple[str, str]]) -> None:
    assert option_settings(options) == expected


@pytest.mark.parametrize("options", ["-c", "-c novalue", "-e", "foo", "--x", "-c a=b\\"])
def test_bad_options(options: str) -> None:
    with pytest.raises(ParameterRefused):
        option_settings(options)


def test_allowed_parameters_are_forwarded() -> None:
    request = policy().evaluate(
        {"user": "alice", "database": "app", "application_name": "psql", "datestyle": "ISO", "options": "-c TimeZone=UTC"}
    )
    assert request.user == "alice" and request.database == "app"
    assert request.forwarded == {"application_name": "psql", "datestyle": "ISO", "TimeZone": "UTC"}


@pytest.mark.parametrize(
    "parameters, reason",
    [
        ({"app.current_tenant": "x"}, "protected"),
        ({"APP.Current_Tenant": "x"}, "protected"),
        ({"options": "-c app.current_tenant=x"}, "protected"),
        ({"options": "--app.current-tenant=x"}, "protected"),
        ({"options": "-c tenant_proxy.proof=1:2"}, "protected"),
        ({"options": "-c request.jwt.claims={}"}, "protected"),
        ({"options": "-c app.other=1"}, "protected"),
        ({"options": "-c session_authorization=postgres"}, "not allowed"),
        ({"options": "-c role=postgres"}, "not allowed"),
        ({"session_preload_libraries": "x"}, "not allowed"),
        ({"replication": "database"}, "replication"),
    ],
)
def test_refused(parameters: dict[str, str], reason: str) -> None:
    with pytest.raises(ParameterRefused, match=reason) as info:
        policy().evaluate({"user": "alice", **parameters})
    assert info.value.sqlstate == errors.INSUFFICIENT_PRIVILEGE


def test_user_is_required() -> None:
    with pytest.raises(ParameterRefused) as info:
        policy().evaluate({"database": "app"})
    assert info.value.sqlstate == errors.INVALID_AUTHORIZATION


def test_protocol_extensions_are_collected_not_forwarded() -> None:
    request = policy().evaluate({"user": "alice", "_pq_.compression": "on"})
    assert request.unrecognized_protocol_options == ["_pq_.compression"]
    assert request.forwarded == {}


@pytest.mark.parametrize(
    "parameters",
    [
        {"standard_conforming_strings": "off"},
        {"standard_conforming_strings": "false"},
        {"standard_conforming_strings": "0"},
        {"standard_conforming_strings": "no"},
        {"standard_conforming_strings": "OF"},
        {"Standard_Conforming_Strings": "f"},
        {"standard_conforming_strings": "maybe"},
        {"options": "-c standard_conforming_strings=off"},
        {"options": "--standard-conforming-strings=false"},
        {"client_encoding": "SJIS"},
        {"client_encoding": "Shift_JIS"},
        {"client_encoding": "BIG5"},
        {"client_encoding": "gbk"},
        {"client_encoding": "GB18030"},
        {"client_encoding": "JOHAB"},
        {"client_encoding": "WIN932"},
        {"client_encoding": "windows-936"},
        {"client_encoding": "win950"},
        {"client_encoding": "SHIFT_JIS_2004"},
        {"options": "-c client_encoding=sjis"},
    ],
)
def test_lexing_settings_the_guard_cannot_read_are_refused(parameters: dict[str, str]) -> None:
    with pytest.raises(ParameterRefused, match="is not supported through pg-tenant-proxy") as info:
        policy().evaluate({"user": "alice", **parameters})
    assert info.value.sqlstate == errors.FEATURE_NOT_SUPPORTED
    assert info.value.hint and ("UTF8" in info.value.hint or "standard_conforming_strings on" in info.value.hint)


@pytest.mark.parametrize(
    "parameters",
    [
        {"standard_conforming_strings": "on"},
        {"standard_conforming_strings": "true"},
        {"standard_conforming_strings": "1"},
        {"client_encoding": "UTF8"},
        {"client_encoding": "utf-8"},
        {"client_encoding": "LATIN1"},
        {"client_encoding": "EUC_JP"},
        {"client_encoding": "UHC"},
        {"options": "-c client_encoding=UTF8 -c standard_conforming_strings=on"},
    ],
)
def test_lexing_settings_the_guard_reads_pass(parameters: dict[str, str]) -> None:
    assert policy().evaluate({"user": "alice", **parameters}).forwarded


@pytest.mark.parametrize(
    "value, expected",
    [("on", True), ("ON", True), ("t", True), ("tru", True), ("yes", True), ("y", True), ("1", True),
     ("off", False), ("of", False), ("f", False), ("no", False), ("n", False), ("0", False),
     ("o", None), ("", None), ("2", None), ("onn", None), ("truee", None)],
)
def test_parse_bool_reads_as_postgres(value: str, expected: bool | None) -> None:
    assert lexing.parse_bool(value) is expected
