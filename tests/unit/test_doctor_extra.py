"""Without psycopg (an install without the doctor extra), `doctor` and `check --connect` say which
extra to install and how, exit 2, and print no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import cli, doctor

CONFIG = """
[upstream]
user = "tenant_app"
database = "app"
[jwt]
secret = "{secret}"
[tenant]
signing_key = "{key}"
"""


@pytest.mark.parametrize("command", [["check", "--connect"], ["doctor"]])
def test_a_command_that_needs_psycopg_names_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(CONFIG.format(secret="j" * 40, key="s" * 40))
    monkeypatch.setattr(doctor, "psycopg", None)
    assert cli.main([command[0], "--config", str(config), *command[1:]]) == 2
    error = capsys.readouterr().err
    assert "`doctor` and `check --connect` need psycopg" in error
    assert "pip install '.[doctor]'" in error and "Traceback" not in error
