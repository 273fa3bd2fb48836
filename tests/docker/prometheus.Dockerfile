# Prometheus for tests/docker/compose.override.yml: Debian's own package on the test's base
# (no registry is reachable there, so prom/prometheus cannot be pulled).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/*
USER nobody
ENTRYPOINT ["/usr/bin/prometheus"]
