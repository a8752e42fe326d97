"""The README's quickstart, run as written on a fresh cluster, ends in an isolated, hardened setup; the
role recipes of docs/policies.md do what that page says.

The commands come from the README's code blocks marked `sh quickstart` (run in order, in one shell),
`sh quickstart-serve` (started in the background, as the second terminal) and `sh quickstart-install`
(checked, not run: the test already runs in an installed venv). Only the server's host and the two
ports are substituted, so a change to the README that breaks a step fails here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from proxy.demo import wait_for_port
from proxy.embedded import EmbeddedPostgres, free_port
from support import REPO

README = REPO / "README.md"
POLICIES = REPO / "docs" / "policies.md"
ALICE, BOB = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"


def code_blocks(path: Path, language: str) -> list[tuple[str, str]]:
    """(tag, text) of each fenced block whose info string is `<language> <tag>`, in order."""
    pattern = re.compile(rf"^ *```{language} ([\w-]+)\n(.*?)^ *```$", re.M | re.S)
    blocks = []
    for match in pattern.finditer(path.read_text()):
        indent = len(match.group(0)) - len(match.group(0).lstrip(" "))
        text = "".join(line[indent:] for line in match.group(2).splitlines(keepends=True))
        blocks.append((match.group(1), text))
    return blocks


def localise(text: str, pg: EmbeddedPostgres, proxy_port: int) -> str:
    """The README's commands pointed at this cluster (administrator over its socket) and a free proxy port."""
    socket_uri = f"postgresql://postgres@{quote(str(pg.socket_dir), safe='')}:{pg.port}"
    replacements = {"postgresql://postgres@localhost:5432": socket_uri, "5432": str(pg.port), "6432": str(proxy_port)}
    return re.sub(r"postgresql://postgres@localhost:5432|\b5432\b|\b6432\b", lambda m: replacements[m.group(0)], text)


@dataclass
class Walkthrough:
    pg: EmbeddedPostgres
    workdir: Path
    setup_output: str
    usage_output: str
    proxy_log: str


def shell(script: str, workdir: Path, env: dict[str, str]) -> str:
    result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"quickstart step failed:\n{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walkthrough]:
    blocks = code_blocks(README, "sh")
    tags = [tag for tag, _ in blocks]
    assert tags.count("quickstart-serve") == 1 and "quickstart" in tags
    serve_at = tags.index("quickstart-serve")
    pg = EmbeddedPostgres().start()  # its own cluster: the quickstart creates roles with fixed names
    proxy_port = free_port()
    workdir = tmp_path_factory.mktemp("quickstart")
    env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(pg.bindir), env.get("PATH", "")])
    before = "\n".join(localise(text, pg, proxy_port) for tag, text in blocks[:serve_at] if tag == "quickstart")
    after = "\n".join(localise(text, pg, proxy_port) for tag, text in blocks[serve_at:] if tag == "quickstart")
    log = workdir / "proxy.log"
    proxy: subprocess.Popen[bytes] | None = None
    try:
        # One shell, as the reader's: what the steps before `run` export is there for the steps after.
        setup_output = shell(before + "\nexport -p > quickstart-env.sh", workdir, env)
        with open(log, "wb") as stderr:
            proxy = subprocess.Popen(["bash", "-c", localise(blocks[serve_at][1], pg, proxy_port)], cwd=workdir,
                                     env=env, stdout=stderr, stderr=stderr, start_new_session=True)
        wait_for_port(proxy_port, proxy)
        usage_output = shell(". ./quickstart-env.sh\n" + after, workdir, env)
        yield Walkthrough(pg, workdir, setup_output, usage_output, log.read_text())
    finally:
        if proxy is not None and proxy.poll() is None:
            os.killpg(proxy.pid, signal.SIGTERM)
            proxy.wait(10)
        pg.stop()


def test_install_step_installs_the_doctor_extra() -> None:
    (install,) = [text for tag, text in code_blocks(README, "sh") if tag == "quickstart-install"]
    assert "pip install '.[doctor]'" in install
    assert "doctor" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_doctor_passes_the_quickstart_database(walkthrough: Walkthrough) -> None:
    counts = re.search(r"(\d+) ok, (\d+) warn, (\d+) fail", walkthrough.setup_output)
    assert counts, walkthrough.setup_output
    assert counts.group(3) == "0", walkthrough.setup_output
    assert "FAIL" not in walkthrough.setup_output
    # A password login is the quickstart's choice (a client certificate removes the warning); before the
    # hardening SQL is part of `sql`, so is pg_stat_activity's visibility. Nothing else may warn.
    warned = set(re.findall(r"^WARN  (.+?)\s{2,}", walkthrough.setup_output, re.M))
    expected = {"upstream role logs in with a password it can change", "other sessions of the upstream role are visible"}
    assert len(warned) == int(counts.group(2)) and warned <= expected, walkthrough.setup_output


def test_each_tenant_sees_only_its_rows_through_the_proxy(walkthrough: Walkthrough) -> None:
    output = walkthrough.usage_output
    selected = output[output.index("tenant_id"):output.index("set_config")]
    assert "Ada Lovelace" in selected and "Grace Hopper" not in selected
    assert ALICE in selected and BOB not in selected
    assert re.search(r"rows_after_forging\s*\n-+\n\s*0\n", output), output
    # Both rows exist, each under its own tenant: the isolation is the policy's, not an empty table.
    rows = walkthrough.pg.psql("SELECT tenant_id || ' ' || name FROM leads ORDER BY id", "app").split("\n")
    assert rows[:2] == [f"{ALICE} Ada Lovelace", f"{BOB} Grace Hopper"]


def test_quickstart_leaves_no_secret_in_output_or_log(walkthrough: Walkthrough) -> None:
    for name in ("upstream-password", "jwt-secret", "tenant-signing-key"):
        secret = (walkthrough.workdir / "secrets" / name).read_text().strip()
        assert len(secret) >= 32
        assert secret not in walkthrough.setup_output + walkthrough.usage_output + walkthrough.proxy_log
    assert oct((walkthrough.workdir / "secrets" / "jwt-secret").stat().st_mode & 0o777) == "0o600"


def as_user(pg: EmbeddedPostgres, user: str, sql: str) -> str:
    return pg.psql(sql, "app", user=user).strip()


def test_policies_doc_migration_and_backup_roles(walkthrough: Walkthrough) -> None:
    pg = walkthrough.pg
    migrator, no_force, backup = [text for tag, text in code_blocks(POLICIES, "sql") if tag == "tested"]
    pg.psql(migrator + backup, "app")
    # Under FORCE the owner has no context and sees nothing; the BYPASSRLS migration role sees every row,
    # and loses that once it takes the owner's identity.
    assert as_user(pg, "postgres", "SET ROLE app_owner; SELECT count(*) FROM leads") == "0"
    assert as_user(pg, "app_migrator", "SELECT count(*) FROM leads") == "2"
    assert as_user(pg, "app_migrator", "ALTER TABLE leads ADD COLUMN note text; SELECT 'altered'") == "altered"
    assert as_user(pg, "app_migrator", "SET ROLE app_owner; SELECT count(*) FROM leads") == "0"
    # The owner's data migration with FORCE lifted for one transaction touches every row and restores FORCE.
    pg.psql("UPDATE leads SET name = ' ' || name || ' '", "app")
    pg.psql("SET ROLE app_owner;\n" + no_force, "app")
    assert as_user(pg, "postgres", "SELECT count(*) FROM leads WHERE name = trim(name)") == "2"
    assert as_user(pg, "postgres", "SELECT relforcerowsecurity FROM pg_class WHERE relname = 'leads'") == "t"
    # pg_dump as the backup role gets every tenant's rows; a reader under the policies fails loudly.
    dump = [str(pg.bindir / "pg_dump"), "-h", str(pg.socket_dir), "-p", str(pg.port), "-d", "app", "--data-only", "-t", "leads"]
    result = subprocess.run(dump + ["-U", "app_backup"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Ada Lovelace" in result.stdout and "Grace Hopper" in result.stdout
    pg.psql("CREATE ROLE reader LOGIN; GRANT pg_read_all_data TO reader; GRANT CONNECT ON DATABASE app TO reader")
    result = subprocess.run(dump + ["-U", "reader"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and 'query would be affected by row-level security policy for table "leads"' in result.stderr
