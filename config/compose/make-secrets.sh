#!/bin/sh
# docker-compose.yml's `secrets` service: random secrets (once; kept in the volume) and the verifier
# SQL carrying the signing key, for the `db` service's init script.
set -eu
cd /run/secrets/pgtp
for name in jwt-secret tenant-signing-key upstream-password; do
    [ -s "$name" ] || python -c 'import secrets; print(secrets.token_urlsafe(32))' > "$name"
done
# A demo: the proxy (uid 10001) and Postgres (uid 999) both read these.
chmod 0644 jwt-secret tenant-signing-key upstream-password
pg-tenant-proxy sql --config /etc/pg-tenant-proxy/pg-tenant-proxy.toml > verifier.sql
chmod 0644 verifier.sql
