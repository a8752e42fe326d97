"""Shipped examples on this machine: their configurations (Kubernetes ConfigMaps, the compose demo)
loaded by proxy.config, with local stand-ins for each file they name (secrets, CA bundles, TLS pairs)
and for the Unix socket directory, so the load checks everything else exactly as `run` would; and the
command line as the container image has it, without psycopg."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from integration.certificates import make_certificates
from proxy import config

# Keys the examples use that the operations work adds to proxy.config ([http], the Unix listener, JSON
# logs, drain, client TLS policy). While proxy.config does not know one yet, it is left out of the load
# (the tests check it from the raw TOML); once it does, proxy.config validates it like every other key.
OPERATIONS_KEYS = {("http", "listen"), ("", "listen_unix"), ("", "log_format"), ("", "shutdown_timeout"),
                   ("tls", "client_sslmode")}
# `python -c WITHOUT_PSYCOPG <command> <args>`: the command line with psycopg absent (the image leaves out
# the `doctor` extra). Importing what `run` imports must not need it.
WITHOUT_PSYCOPG = """
import sys
sys.modules["psycopg"] = None  # any import of psycopg now raises ImportError
import proxy.cli, proxy.server, proxy.workers
sys.exit(proxy.cli.main(sys.argv[1:]))
"""
CERTIFICATE_KEYS = {"ca_file": 0, "client_ca_file": 0, "cert_file": 1, "key_file": 2}


def file_paths(raw: dict[str, Any]) -> list[str]:
    """Every `*_file` value in a parsed configuration."""
    return [value for section in raw.values() if isinstance(section, dict)
            for key, value in section.items() if key.endswith("_file")]


def toml_text(raw: dict[str, Any]) -> str:
    """A parsed configuration written back as TOML (strings, numbers, booleans and lists of strings)."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in raw.items() if not isinstance(value, dict)]
    for section, values in raw.items():
        if isinstance(values, dict) and values:
            lines += [f"[{section}]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def with_stand_ins(raw: dict[str, Any], directory: Path) -> dict[str, Any]:
    """A copy of `raw` whose files and socket directory are local: secrets of 40 bytes, a real CA and a
    real certificate and key, the socket under `directory`; keys proxy.config does not know left out."""
    certificates = make_certificates(directory)
    local = copy.deepcopy(raw)
    for section in [local] + [values for values in local.values() if isinstance(values, dict)]:
        for key, value in list(section.items()):
            if key in CERTIFICATE_KEYS:
                section[key] = str(certificates[CERTIFICATE_KEYS[key]])
            elif key.endswith("_file"):
                stand_in = directory / value.strip("/").replace("/", "_")
                stand_in.write_text("x" * 40)
                section[key] = str(stand_in)
    if "listen_unix" in local:
        local["listen_unix"] = str(directory / Path(local["listen_unix"]).name)
    for section_name, key in OPERATIONS_KEYS:
        if (section_name, key) not in config.SCHEMA:
            (local.get(section_name, {}) if section_name else local).pop(key, None)
    return local


def load_with_stand_ins(raw: dict[str, Any], directory: Path) -> config.Settings:
    """proxy.config's reading of `raw` with local stand-ins (see with_stand_ins)."""
    target = directory / "example.toml"
    target.write_text(toml_text(with_stand_ins(raw, directory)))
    return config.load(target, environ={})
