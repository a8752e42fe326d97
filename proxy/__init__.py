"""pg-tenant-proxy: a Postgres wire-protocol proxy that turns a JWT into tenant isolation."""

__version__ = "0.1.0"
