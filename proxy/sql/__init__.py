"""SQL files shipped with pg-tenant-proxy."""
