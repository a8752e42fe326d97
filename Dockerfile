# pg-tenant-proxy container image: a build stage makes a virtual environment from pinned dependencies,
# the runtime stage copies only that environment onto a clean slim base and runs it as a non-root user.
#   docker build -t pg-tenant-proxy:0.1.0 .                          # the proxy
#   docker build --build-arg EXTRAS='[doctor]' -t pg-tenant-proxy:0.1.0-doctor .   # plus `doctor` (psycopg)
# The configuration is mounted at /etc/pg-tenant-proxy/pg-tenant-proxy.toml, secrets as files
# (see config/kubernetes/ and docker-compose.yml).

FROM python:3.11-slim AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/pg-tenant-proxy
COPY constraints.txt pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
RUN /opt/pg-tenant-proxy/bin/pip install --constraint constraints.txt ".${EXTRAS}" \
 && /opt/pg-tenant-proxy/bin/python -m compileall -q /opt/pg-tenant-proxy/lib

FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="pg-tenant-proxy" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 pgtp \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgtp \
 && mkdir -p /etc/pg-tenant-proxy /var/run/pgtp \
 && chown 10001:10001 /var/run/pgtp
COPY --from=build /opt/pg-tenant-proxy /opt/pg-tenant-proxy
COPY LICENSE /usr/share/doc/pg-tenant-proxy/LICENSE
# HEALTHCHECK_URL must match `[http] listen` in the mounted configuration; /healthz answers 200 while
# the process serves. With [http] off, run the container with --no-healthcheck.
ENV PATH=/opt/pg-tenant-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HEALTHCHECK_URL=http://127.0.0.1:9930/healthz
USER 10001:10001
EXPOSE 6432 9930
# SIGTERM drains: the proxy stops accepting and lets each client finish its transaction.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=2)"]
ENTRYPOINT ["pg-tenant-proxy"]
CMD ["run", "--config", "/etc/pg-tenant-proxy/pg-tenant-proxy.toml"]
