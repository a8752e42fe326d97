"""The SQL the project ships: the verifier script (with or without a signing key) and the demo schema."""

from __future__ import annotations

from importlib import resources

from proxy.tenant import hmac_pads, quote_literal


def _template(name: str) -> str:
    return resources.files("proxy.sql").joinpath(name).read_text()


def verifier_sql(
    setting: str,
    proof_setting: str,
    signing_key: str | None,
    claims_setting: str = "request.jwt.claims",
    claims_proof_setting: str = "tenant_proxy.claims_proof",
    previous_signing_key: str | None = None,
) -> str:
    """The idempotent install script; with a key it also installs (or rotates to) that key as the
    current one (row 1), and `previous_signing_key` as the previous one (row 2) or, without it, removes
    any previous key: the two steps of a rotation (docs/operations.md)."""
    script = _template("verifier.sql").replace("@SETTING@", quote_literal(setting))
    script = script.replace("@PROOF_SETTING@", quote_literal(proof_setting))
    script = script.replace("@CLAIMS_SETTING@", quote_literal(claims_setting))
    script = script.replace("@CLAIMS_PROOF_SETTING@", quote_literal(claims_proof_setting))
    if signing_key is None:
        script += (
            "\n-- No signing key was given: run `pg-tenant-proxy sql --config FILE` to include the key\n"
            "-- of that configuration. Until a key is installed, current_tenant() returns NULL.\n"
        )
    else:
        script += "\n-- The key the proxy signs with.\n" + _install_key(1, signing_key)
        if previous_signing_key is None:
            script += "\n-- No previous key: contexts signed with any other key no longer verify.\n"
            script += "DELETE FROM tenant_proxy.signing_key WHERE id = 2;\n"
        else:
            script += "\n-- The previous key, accepted until the proxies have reloaded with the current one.\n"
            script += _install_key(2, previous_signing_key)
    return script + "\nCOMMIT;\n"


def _install_key(row: int, key: str) -> str:
    """An upsert of `key` as its HMAC pads into row `row` of tenant_proxy.signing_key."""
    inner, outer = hmac_pads(key.encode())
    return (
        "INSERT INTO tenant_proxy.signing_key (id, inner_pad, outer_pad)\n"
        f"VALUES ({row}, decode('{inner.hex()}', 'hex'), decode('{outer.hex()}', 'hex'))\n"
        "ON CONFLICT (id) DO UPDATE\n"
        "    SET inner_pad = EXCLUDED.inner_pad, outer_pad = EXCLUDED.outer_pad, installed_at = now();\n"
    )


def demo_sql(app_role: str) -> str:
    """The seed example schema (table `leads` under the strict policy), granted to `app_role`."""
    return _template("demo.sql").replace("@APP_ROLE@", '"' + app_role.replace('"', '""') + '"')
