"""Roles from the token: parsing [roles] (every problem reported, naming its key) and choosing the login role."""

from __future__ import annotations

import asyncio

from pathlib import Path
from typing import Any

import pytest

from proxy import config
from proxy.roles import LoginPools, RoleRefused, login_role
from proxy.pool import SessionPool, TransactionPool
from proxy.tokens import Identity

BASE = """
[upstream]
user = "app"
password = "main-secret"
database = "app"
sslmode = "disable"
[jwt]
secret = "%s"
[tenant]
signing_key = "%s"
""" % ("j" * 32, "k" * 32)

ROLES = """
[roles]
role_claim = "https://example.com/claims.role"

[roles.map.viewer]
user = "app_viewer"
password = "viewer-secret"

[roles.map.editor]
user = "app_editor"
password_file = "%s"
"""


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> config.Settings:
    path = tmp_path / "proxy.toml"
    path.write_text(BASE + text)
    return config.load(path, environ=environ or {})


def problems(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(config.ConfigError) as raised:
        load(tmp_path, text, environ)
    return raised.value.problems


def editor_password(tmp_path: Path) -> str:
    path = tmp_path / "editor.password"
    path.write_text("editor-secret\n")
    return str(path)


def test_no_roles_keeps_the_main_user(tmp_path: Path) -> None:
    settings = load(tmp_path, "")
    assert settings.roles.logins == {} and settings.roles.role_claim is None
    assert login_role(settings.roles, {"role": "viewer"}) is None


def test_each_role_logs_in_with_its_own_credentials_and_the_upstream_connection(tmp_path: Path) -> None:
    settings = load(tmp_path, ROLES % editor_password(tmp_path))
    viewer, editor = settings.roles.logins["viewer"], settings.roles.logins["editor"]
    assert (viewer.user, viewer.password) == ("app_viewer", "viewer-secret")
    assert (editor.user, editor.password) == ("app_editor", "editor-secret")
    for login in (viewer, editor):
        assert (login.host, login.port, login.database, login.sslmode) == ("127.0.0.1", 5432, "app", "disable")
        assert login.sslcert is None
    assert settings.upstream.user == "app" and settings.upstream.password == "main-secret"


def test_roles_from_the_environment(tmp_path: Path) -> None:
    environ = {"PGTP_ROLES_ROLE_CLAIM": "app_metadata.roles[0]",
               "PGTP_ROLES_MAP": '{"viewer": {"user": "app_viewer", "password": "v"}}'}
    settings = load(tmp_path, "", environ)
    assert settings.roles.role_claim == "app_metadata.roles[0]"
    assert settings.roles.logins["viewer"].user == "app_viewer"


@pytest.mark.parametrize("text, expected", [
    ('[roles]\nrole_claim = "role"\n', "roles.map: map at least one value"),
    ('[roles.map.viewer]\nuser = "v"\n', "roles.role_claim: required with [roles.map]"),
    ('[roles]\nrole_claim = "a..b"\n[roles.map.viewer]\nuser = "v"\n', "roles.role_claim: claim path 'a..b'"),
    ('[roles]\nrole_claim = "role"\n[roles.map.viewer]\npassword = "p"\n', "roles.map.viewer.user: required"),
    ('[roles]\nrole_claim = "role"\n[roles.map.viewer]\nuser = "v"\nsize = 3\n', "roles.map.viewer.size: unknown key"),
    ('[roles]\nrole_claim = "role"\n[roles.map.viewer]\nuser = 7\n', "roles.map.viewer.user: expected str"),
    ('[roles]\nrole_claim = "role"\n[roles.map.viewer]\nuser = "v"\npassword = "p"\npassword_file = "/etc/hostname"\n',
     "roles.map.viewer.password and roles.map.viewer.password_file are both set"),
    ('[roles]\nrole_claim = "role"\n[roles.map.viewer]\nuser = "v"\npassword_file = "/nonexistent"\n',
     "roles.map.viewer.password_file: cannot read /nonexistent"),
    ('[roles]\nrole_claim = "role"\n[roles.map.viewer]\nuser = "v"\nsslcert = "/nonexistent"\n',
     "roles.map.viewer.sslcert and roles.map.viewer.sslkey: set both or neither"),
    ('[roles]\nrole_claim = "role"\n[roles.map.viewer]\nuser = "v"\nsslcert = "/nonexistent"\nsslkey = "/nonexistent"\n',
     "roles.map.viewer.sslcert: a client certificate needs TLS"),
    ('[roles]\nrole_claim = "role"\n[roles.map."team.lead"]\nuser = 1\n', 'roles.map."team.lead".user: expected str'),
    ('[roles]\nrole_claim = "role"\nmap = "viewer"\n', "roles.map: expected a table"),
    ('[roles]\nrole_claim = "role"\n[roles.map]\nviewer = "app_viewer"\n', "roles.map.viewer: expected a table"),
    ('[roles]\nrole_claim = "role"\nsuperuser = true\n', "unknown key roles.superuser"),
])
def test_each_problem_names_its_key(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(line.startswith(expected) for line in found), found


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, '[roles]\nrole_claim = "role"\n[roles.map.viewer]\nsslkey = "k"\n'
                               '[roles.map.editor]\nuser = "e"\nbogus = 1\n')
    assert "roles.map.viewer.user: required (the role this claim value logs in as)" in found
    assert "roles.map.viewer.sslcert and roles.map.viewer.sslkey: set both or neither" in found
    assert any(line.startswith("roles.map.editor.bogus: unknown key") for line in found)


def test_a_problem_never_shows_a_password(tmp_path: Path) -> None:
    found = problems(tmp_path, '[roles]\nrole_claim = "role"\n[roles.map.viewer]\npassword = "hunter2-secret"\n'
                               'sslcert = "/nonexistent"\n')
    assert found and not any("hunter2" in line for line in found)


def test_the_cli_exits_2_with_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    path = tmp_path / "proxy.toml"
    path.write_text(BASE + '[roles]\nrole_claim = "role"\n[roles.map.viewer]\nsslkey = "k"\n')
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "roles.map.viewer.user: required" in err
    assert "roles.map.viewer.sslcert and roles.map.viewer.sslkey: set both or neither" in err


ROLE_SETTINGS = config.RolesSettings("https://example.com/claims.role", {
    "viewer": config.UpstreamSettings("h", 5432, "app_viewer", "v", "app", None, "disable", None, None, None, 1.0),
    "editor": config.UpstreamSettings("h", 5432, "app_editor", "e", "app", None, "disable", None, None, None, 1.0),
})


@pytest.mark.parametrize("claims, expected", [
    ({"https://example.com/claims.role": "viewer"}, "viewer"),  # an Auth0 namespaced claim, as written
    ({"https://example.com/claims.role": "editor", "role": "viewer"}, "editor"),
])
def test_the_claim_chooses_the_role(claims: dict[str, Any], expected: str) -> None:
    assert login_role(ROLE_SETTINGS, claims) == expected


def test_dotted_and_indexed_claim_paths() -> None:
    nested = config.RolesSettings("app_metadata.roles[1]", ROLE_SETTINGS.logins)
    assert login_role(nested, {"app_metadata": {"roles": ["viewer", "editor"]}}) == "editor"


@pytest.mark.parametrize("claims, reason", [
    ({}, 'the token has no "https://example.com/claims.role" claim'),
    ({"role": "editor"}, 'the token has no "https://example.com/claims.role" claim'),
    ({"https://example.com/claims.role": "admin"}, "names a role this proxy does not map"),
    ({"https://example.com/claims.role": "Viewer"}, "names a role this proxy does not map"),
    ({"https://example.com/claims.role": ["viewer"]}, "is not a string"),
    ({"https://example.com/claims.role": None}, "is not a string"),
    ({"https://example.com/claims.role": {"viewer": True}}, "is not a string"),
])
def test_an_unmapped_or_missing_role_is_refused_with_28000(claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(RoleRefused) as refused:
        login_role(ROLE_SETTINGS, claims)
    assert refused.value.sqlstate == "28000"
    assert reason in str(refused.value)
    assert "admin" not in str(refused.value) and "Viewer" not in str(refused.value)  # never the claim's value


@pytest.mark.parametrize("kind", [SessionPool, TransactionPool])
def test_each_role_has_its_own_pool_of_the_configured_kind(tmp_path: Path, kind: type[Any]) -> None:
    settings = load(tmp_path, ROLES % editor_password(tmp_path))
    loop = asyncio.new_event_loop()  # the pools keep it; nothing runs on it here
    loop.close()
    main = kind(settings.upstream, settings.pool, loop)
    pools = LoginPools(main, settings.roles, settings.pool)

    def identity(**claims: Any) -> Identity:
        return Identity("t", None, 0, claims)

    viewer = pools.for_identity(identity(**{"https://example.com/claims.role": "viewer"}))
    editor = pools.for_identity(identity(**{"https://example.com/claims.role": "editor"}))
    assert isinstance(viewer, kind) and isinstance(editor, kind)
    assert len({id(main), id(viewer), id(editor)}) == 3
    assert viewer.loop is editor.loop is loop
    assert (viewer.upstream.user, editor.upstream.user) == ("app_viewer", "app_editor")
    assert pools.for_identity(identity(**{"https://example.com/claims.role": "viewer"})) is viewer
    assert LoginPools(main, config.RolesSettings(None, {}), settings.pool).for_identity(identity(role="x")) is main
    with pytest.raises(RoleRefused):
        pools.for_identity(identity(role="viewer"))
