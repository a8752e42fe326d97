FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgtp
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . && rm -rf /root/.cache
USER pgtp
EXPOSE 6432
ENTRYPOINT ["pg-tenant-proxy"]
CMD ["run", "--config", "/etc/pg-tenant-proxy/pg-tenant-proxy.toml"]
