# pgmux: the connection pooler, runtime dependencies only, as a non-root user.
# Configure it with PGMUX_* environment variables (PGMUX_UPSTREAM_URL at least) or a pgmux.toml
# mounted at /etc/pgmux/pgmux.toml. The image build is not exercised by the test suite (no Docker
# engine on the machine that runs it); tests/unit/test_deploy_files.py checks this file against the code.
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
# A compiler in the build stage only: the pgmux wheel then carries the compiled hot path (mypyc
# modules and proxy/protocol/_scanner.c, see setup.py); the runtime image stays without one.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
# Wheels for pgmux and its runtime dependencies only (no test or dev extras).
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim
RUN useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin pgmux \
    && mkdir -p /etc/pgmux
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
# pgmux reads ./pgmux.toml when present: mount one here, or use PGMUX_* variables.
WORKDIR /etc/pgmux
ENV PGMUX_LISTEN=0.0.0.0:6432 \
    PGMUX_METRICS_LISTEN=0.0.0.0:9127 \
    PGMUX_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
USER pgmux
# 6432: the pooler (transaction pooling by default); 9127: /metrics, /healthz, /readyz.
EXPOSE 6432 9127
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('PGMUX_METRICS_LISTEN', '0.0.0.0:9127').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["pgmux"]
CMD ["serve"]
