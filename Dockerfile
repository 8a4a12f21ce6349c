# syntax=docker/dockerfile:1
# nexus-fast server image (linux/amd64). Build: docker build -t nexus-fast .
# Run:  docker run -v nexus-data:/var/lib/nexus-fast -v ./nexus.toml:/etc/nexus-fast/nexus.toml:ro \
#         -v ./tls:/etc/nexus-fast/tls:ro -p 50053:50053 -p 8081:8081 -p 8082:8082 nexus-fast
# (docs/deployment.md). The install steps live in deploy/install.sh, which
# tests/integration/test_deploy.py runs the same way in clean venvs.
#
# Base: python:3.11-slim-bookworm, linux/amd64 manifest (Python 3.11.16, built 2026-08-25),
# pinned by digest so a rebuild gets the same bytes. Refresh it on purpose:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   (the linux/amd64 digest)
ARG BASE=python:3.11-slim-bookworm@sha256:2fc9207f64226cb05ac317cee0bab6fa55a9ea311ce5a086baddd4b4a83c2d3c

# ---- build stage: compiles the Cython hot paths; a missing compiler fails the build.
FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements-build.lock pyproject.toml setup.py README.md LICENSE ./
COPY deploy/install.sh deploy/install.sh
COPY proto proto
COPY _ext _ext
COPY nexus_fast nexus_fast
RUN --mount=type=cache,target=/root/.cache/pip sh deploy/install.sh build /wheels

# ---- runtime stage: no compiler, no build tools; the locked wheels (hash-checked) only.
FROM ${BASE}
# The dependencies first: their layer is rebuilt only when the lock changes, and BuildKit
# installs them while the build stage compiles.
COPY requirements.lock deploy/install.sh /tmp/
RUN --mount=type=cache,target=/root/.cache/pip sh /tmp/install.sh deps /tmp/requirements.lock
COPY --from=build /wheels /wheels
RUN sh /tmp/install.sh app /wheels && rm -rf /wheels /tmp/install.sh /tmp/requirements.lock
RUN groupadd --system --gid 10001 nexus \
 && useradd --system --uid 10001 --gid nexus --home-dir /var/lib/nexus-fast --no-create-home \
        --shell /usr/sbin/nologin nexus \
 && install -d -o nexus -g nexus -m 0700 /var/lib/nexus-fast
COPY configs/production.toml /etc/nexus-fast/nexus.toml
COPY deploy/healthcheck.py /usr/local/bin/nexus-healthcheck
# NEXUS_REQUIRE_EXTENSIONS: never silently run the slow pure-Python twins. Nothing else is
# set by environment: a NEXUS_* variable outranks the file, so the file (database.path
# /var/lib/nexus-fast, the volume below, json logs) stays the one place to change, and what
# a reload (SIGHUP) re-reads.
ENV NEXUS_REQUIRE_EXTENSIONS=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER nexus:nexus
VOLUME /var/lib/nexus-fast
# gRPC (NodeService, ControlService, health), WebSocket events, HTTP (probes, metrics, API).
EXPOSE 50053 8081 8082
STOPSIGNAL SIGTERM
# Reads the port (and TLS) from the same file and NEXUS_* variables the server reads.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/nexus-healthcheck", "--config", "/etc/nexus-fast/nexus.toml"]
ENTRYPOINT ["nexus-fast", "--config", "/etc/nexus-fast/nexus.toml"]
