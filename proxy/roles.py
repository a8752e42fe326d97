"""Roles from the token: which upstream login role a client's session uses, and one pool per role.

With `[roles]`, the value of the token's `role_claim` (a claim path, proxy/auth/claims.py) chooses a
`[roles.map.<value>]` entry, and the client's session logs in upstream as that entry's role, through
that role's own pools. The boundary is the login role, not `SET ROLE`: a session can always undo a
`SET ROLE` (RESET ROLE, set_config('role', ...), dynamic SQL in a function), but it cannot become a
role its login role is not a member of. So a server connection logged in as one role never serves a
client of another: each role has its own SessionPool or TransactionPool, chosen once at login.

Without `[roles]`, every client uses the pool of `[upstream] user`, as before.
"""

from __future__ import annotations

from typing import Any

from proxy.auth.claims import MISSING, lookup
from proxy.config import PoolSettings, RolesSettings
from proxy.pool import SessionPool, TransactionPool
from proxy.protocol import errors
from proxy.tokens import Identity, TokenRejected

AnyPool = SessionPool | TransactionPool


class RoleRefused(TokenRejected):
    """The token's role claim is missing or maps to no login role: 28000 (invalid_authorization_specification),
    naming the claim path but never its value."""

    sqlstate = errors.INVALID_AUTHORIZATION


def login_role(roles: RolesSettings, claims: dict[str, Any]) -> str | None:
    """The `[roles.map]` key the verified `claims` choose: the value at `roles.role_claim`, which must be
    one string that is a key of the map; None when no `[roles]` is configured.

    Raises RoleRefused (SQLSTATE 28000) when the claim is absent, is not a string, or is not mapped."""
    if not roles.logins:
        return None
    path = roles.role_claim or ""
    value = lookup(claims, path)
    hint = "([roles] role_claim chooses the database role; ask for a token that carries a mapped role)"
    if value is MISSING:
        raise RoleRefused(f'the token has no "{path}" claim {hint}')
    if not isinstance(value, str):
        raise RoleRefused(f'the token\'s "{path}" claim is not a string; [roles] role_claim must name one '
                          "string (an index such as roles[0] picks one element of an array)")
    if value not in roles.logins:
        raise RoleRefused(f'the token\'s "{path}" claim names a role this proxy does not map ([roles.map]) {hint}')
    return value


class LoginPools:
    """The pools of every login role: `main` for `[upstream] user`, and one pool of the same kind
    (session or transaction mode) per `[roles.map]` entry, each opening connections with that entry's
    user and credentials."""

    def __init__(self, main: AnyPool, roles: RolesSettings, settings: PoolSettings) -> None:
        self.main = main
        self.roles = roles
        kind = type(main)
        self.by_role: dict[str, AnyPool] = {value: kind(login, settings, main.loop) for value, login in roles.logins.items()}

    def for_identity(self, identity: Identity) -> AnyPool:
        """The pool a client with this verified identity uses for its whole session; raises RoleRefused
        (28000) as `login_role` does."""
        value = login_role(self.roles, identity.claims)
        return self.main if value is None else self.by_role[value]

    def every(self) -> list[AnyPool]:
        """The main pool, then each mapped role's; each pool's login user is `pool.upstream.user`."""
        return [self.main, *self.by_role.values()]

    def counts(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """`Pool.counts` summed over every login role's pool, by database."""
        totals: tuple[dict[str, int], dict[str, int], dict[str, int]] = ({}, {}, {})
        for pool in self.every():
            for total, part in zip(totals, pool.counts()):
                for database, count in part.items():
                    total[database] = total.get(database, 0) + count
        return totals
