"""`check --connect`: what a valid configuration cannot tell without the network. Logs in upstream as
the proxy would, checks that the verifier is installed and accepts the configured signing key (the
doctor's self-test), and fetches the JWKS URL. Each problem is one line naming the key to look at.
"""

from __future__ import annotations

import jwt
import psycopg

from proxy.config import Settings
from proxy.doctor import OK, Audit, check_verifier, connect_upstream


def connect_problems(settings: Settings, database: str | None) -> list[str]:
    """Problems found by logging in upstream and fetching keys; [] when all is well."""
    upstream = settings.upstream
    name = database or upstream.database or upstream.user
    problems: list[str] = []
    try:
        with connect_upstream(settings, name) as conn:
            for finding in check_verifier(Audit(conn, None, settings, "tenant_id")):
                if finding.status != OK:
                    what = "; ".join(finding.objects) if finding.detail == "" else finding.detail
                    fix = finding.fix.splitlines()[0] if finding.fix else ""
                    problems.append(f"tenant.signing_key: verifier check failed in database {name}: {what} ({fix})")
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problems.append(f"upstream: cannot log in as {upstream.user} to {upstream.host}:{upstream.port}/{name}: {reason}")
    if settings.jwt.jwks_url:
        try:
            jwt.PyJWKClient(settings.jwt.jwks_url, timeout=int(upstream.connect_timeout_seconds) or 1).get_jwk_set()
        except jwt.PyJWTError as exc:
            problems.append(f"jwt.jwks_url: cannot fetch a usable key set: {exc}")
    return problems
