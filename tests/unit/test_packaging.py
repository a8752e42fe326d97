"""The container image and the compose demo, checked without Docker (there is none here): the Dockerfile
and docker-compose.yml are parsed and held to what the proxy needs, the pinned constraints cover every
runtime dependency, and `doctor` says which extra it needs when psycopg is missing (the proxy serving
without it is tested in tests/integration/test_compose_demo.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from examples import WITHOUT_PSYCOPG, file_paths, load_with_stand_ins
from test_manifests import port_of

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONTAINER_CONFIG = "/etc/pg-tenant-proxy/pg-tenant-proxy.toml"


def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """The Dockerfile as (stage name, [(INSTRUCTION, arguments)]), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append((arguments.split(" AS ")[-1].strip(), []))
        stages[-1][1].append((instruction.upper(), arguments.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [arguments for instruction, arguments in stage if instruction == name]


def test_dockerfile_is_multi_stage_and_runs_unprivileged() -> None:
    stages = dockerfile_stages()
    assert [name for name, _ in stages] == ["build", "runtime"]
    runtime = stages[-1][1]
    assert instructions(runtime, "COPY")[0].startswith("--from=build ")
    assert not any("pip install" in run for run in instructions(runtime, "RUN")), "the runtime stage installs nothing"
    (user,) = instructions(runtime, "USER")
    assert int(user.split(":")[0]) != 0 and int(user.split(":")[1]) != 0
    assert instructions(runtime, "STOPSIGNAL") == ["SIGTERM"]
    assert instructions(runtime, "ENTRYPOINT") == ['["pg-tenant-proxy"]']
    assert instructions(runtime, "CMD") == [f'["run", "--config", "{CONTAINER_CONFIG}"]']


def test_dockerfile_healthcheck_polls_healthz() -> None:
    runtime = dockerfile_stages()[-1][1]
    (healthcheck,) = instructions(runtime, "HEALTHCHECK")
    assert "CMD" in healthcheck and "HEALTHCHECK_URL" in healthcheck
    url = re.search(r"HEALTHCHECK_URL=(\S+)", " ".join(instructions(runtime, "ENV")))
    assert url and re.fullmatch(r"http://127\.0\.0\.1:\d+/healthz", url.group(1))
    exposed = {int(port) for port in " ".join(instructions(runtime, "EXPOSE")).split()}
    assert exposed == {6432, port_of(url.group(1).removesuffix("/healthz"))}


def test_dockerfile_installs_from_the_pinned_constraints() -> None:
    (install,) = [run for run in instructions(dockerfile_stages()[0][1], "RUN") if "pip install" in run]
    assert "--constraint constraints.txt" in install and '".${EXTRAS}"' in install


def constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_constraints_pin_every_runtime_dependency() -> None:
    pins = constraints()
    project = PYPROJECT["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["doctor"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} does not satisfy {requirement}"


def test_psycopg_is_only_in_the_doctor_and_test_extras() -> None:
    def names(requirements: list[str]) -> set[str]:
        return {canonicalize_name(Requirement(text).name) for text in requirements}

    project = PYPROJECT["project"]
    assert "psycopg" not in names(project["dependencies"])
    assert "psycopg" in names(project["optional-dependencies"]["doctor"])
    assert "psycopg" in names(project["optional-dependencies"]["test"])


@pytest.mark.parametrize("command", [["doctor"], ["check", "--connect"]])
def test_doctor_without_psycopg_names_the_extra(tmp_path: Path, command: list[str]) -> None:
    """Both commands that need psycopg say so, naming both, and how to install the extra from a clone."""
    config = tmp_path / "proxy.toml"
    config.write_text(f'[upstream]\nuser = "app"\ndatabase = "app"\n[jwt]\nsecret = "{"s" * 40}"\n'
                      f'[tenant]\nsigning_key = "{"k" * 40}"\n')
    result = subprocess.run([sys.executable, "-c", WITHOUT_PSYCOPG, command[0], "--config", str(config), *command[1:]],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "`doctor` and `check --connect` need psycopg" in result.stderr
    assert "pip install '.[doctor]'" in result.stderr
    assert "Traceback" not in result.stderr


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def host_file(mount: str) -> Path:
    return REPO / mount.split(":")[0]


def test_compose_demo_services_start_in_order() -> None:
    services = compose()["services"]
    assert set(services) == {"secrets", "db", "proxy"}
    assert services["db"]["depends_on"] == {"secrets": {"condition": "service_completed_successfully"}}
    assert services["proxy"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert "-h" in services["db"]["healthcheck"]["test"], "pg_isready over the socket passes during initdb"
    version = PYPROJECT["project"]["version"]
    assert services["secrets"]["image"] == services["proxy"]["image"] == f"pg-tenant-proxy:{version}"
    assert services["secrets"]["build"] == "."
    for service in services.values():
        for mount in service.get("volumes", []):
            if mount.startswith("./"):
                assert host_file(mount).exists(), mount
            else:
                assert mount.split(":")[0] in compose()["volumes"], mount


def test_compose_proxy_configuration_matches_its_ports(tmp_path: Path) -> None:
    proxy = compose()["services"]["proxy"]
    (mount,) = [m for m in proxy["volumes"] if m.split(":")[1] == CONTAINER_CONFIG]
    raw = tomllib.loads(host_file(mount).read_text())
    settings = load_with_stand_ins(raw, tmp_path)
    assert settings.upstream.host == "db" and settings.upstream.password is not None
    published = {int(port.split(":")[-1]) for port in proxy["ports"]}
    assert published == {settings.listen_port, port_of(raw["http"]["listen"])}
    secrets_dir = next(m.split(":")[1] for m in proxy["volumes"] if m.startswith("secrets:"))
    made = (REPO / "config" / "compose" / "make-secrets.sh").read_text()
    for path in file_paths(raw):
        directory, _, name = path.rpartition("/")
        assert directory == secrets_dir and re.search(rf"\b{name}\b", made), f"{path} is not made by make-secrets.sh"
