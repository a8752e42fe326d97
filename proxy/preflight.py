"""`check --connect`: what a valid configuration cannot tell without the network. Logs in upstream as
the proxy would (as [upstream] user and as each [roles.map] role), checks that the verifier is
installed, has every function the proxy calls, and accepts the configured signing key (the doctor's
self-test), and fetches each issuer's key set (JWKS URL or OpenID discovery). Each problem is one line
naming the key to look at.
"""

from __future__ import annotations

from dataclasses import replace

from proxy import doctor
from proxy.auth.keys import FetchError, Keys, discover_jwks_uri, http_get_json
from proxy.config import IssuerSettings, Settings


def connect_problems(settings: Settings, database: str | None) -> list[str]:
    """Problems found by logging in upstream and fetching keys; [] when all is well. Needs psycopg
    (the doctor extra): the caller checks `doctor.psycopg` first."""
    upstream = settings.upstream
    name = database or upstream.database or (upstream.databases or [upstream.user])[0]
    problems: list[str] = []
    try:
        with doctor.connect_upstream(settings, name) as conn:
            for finding in doctor.check_verifier(doctor.Audit(conn, None, settings, "tenant_id")):
                if finding.status != doctor.OK:
                    what = "; ".join(finding.objects) if finding.detail == "" else finding.detail
                    fix = finding.fix.splitlines()[0] if finding.fix else ""
                    problems.append(f"tenant.signing_key: verifier check failed in database {name}: {what} ({fix})")
            missing = doctor.missing_verifier_functions(conn)
            if missing:
                problems.append(f"upstream: the verifier in database {name} lacks {', '.join(missing)}, which the proxy"
                                f" calls; install the current one: {doctor.install_command(settings)}")
    except doctor.psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problems.append(f"upstream: cannot log in as {upstream.user} to {upstream.host}:{upstream.port}/{name}: {reason}")
    problems += _login_role_problems(settings, name)
    several = len(settings.jwt.issuers) > 1
    for number, issuer in enumerate(settings.jwt.issuers):
        problem = _key_set_problem(issuer, settings.jwt.jwks_timeout_seconds)
        if problem:
            problems.append((f"jwt.issuers[{number}]" if several else "jwt") + problem)
    return problems


def _login_role_problems(settings: Settings, database: str) -> list[str]:
    """[roles]: one line per mapped login role that cannot log in as the proxy would log it in."""
    problems: list[str] = []
    for value, login in settings.roles.logins.items():
        try:
            doctor.connect_upstream(replace(settings, upstream=login), database).close()
        except doctor.psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append(f"roles.map.{value}: cannot log in as {login.user} to {login.host}:{login.port}/{database}: "
                            f"{reason}")
    return problems


def _key_set_problem(issuer: IssuerSettings, timeout: float) -> str | None:
    """'.<key>: why' when the issuer's remote key set cannot be had now; None when it can or is local."""
    key = "jwks_url" if issuer.jwks_url else "discovery"
    try:
        if issuer.jwks_url:
            url = issuer.jwks_url
        elif issuer.discovery and issuer.issuer:
            url = discover_jwks_uri(issuer.issuer, http_get_json, timeout)
        else:
            return None
        document, _ = http_get_json(url, timeout)
        if not Keys(document).by_kid:
            raise FetchError("the key set holds no usable signing key")
    except FetchError as exc:
        return f".{key}: cannot fetch a usable key set: {exc}"
    return None
