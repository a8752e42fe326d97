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
) -> str:
    """The idempotent install script; with a key it also installs (or rotates to) that key."""
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
        inner, outer = hmac_pads(signing_key.encode())
        script += (
            "\nINSERT INTO tenant_proxy.signing_key (id, inner_pad, outer_pad)\n"
            f"VALUES (1, decode('{inner.hex()}', 'hex'), decode('{outer.hex()}', 'hex'))\n"
            "ON CONFLICT (id) DO UPDATE\n"
            "    SET inner_pad = EXCLUDED.inner_pad, outer_pad = EXCLUDED.outer_pad, installed_at = now();\n"
        )
    return script + "\nCOMMIT;\n"


def demo_sql(app_role: str) -> str:
    """The seed example schema (table `leads` under the strict policy), granted to `app_role`."""
    return _template("demo.sql").replace("@APP_ROLE@", '"' + app_role.replace('"', '""') + '"')
