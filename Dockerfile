# nexus-fast server image. Build: docker build -t nexus-fast .
# The build stage compiles the Cython hot paths (a missing compiler fails the build);
# the runtime image requires them (NEXUS_REQUIRE_EXTENSIONS=1), so it can never silently
# run the slow pure-Python twins.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY _ext _ext
COPY nexus_fast nexus_fast
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --home /var/lib/nexus-fast --create-home nexus
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY configs /etc/nexus-fast
ENV NEXUS_REQUIRE_EXTENSIONS=1 \
    NEXUS_DB_PATH=/var/lib/nexus-fast/data \
    NEXUS_LOG_FORMAT=json
USER nexus
VOLUME /var/lib/nexus-fast
EXPOSE 50053 8081 8082
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8082/ready', timeout=2).status != 200)"
ENTRYPOINT ["nexus-fast", "--config", "/etc/nexus-fast/production.toml"]
