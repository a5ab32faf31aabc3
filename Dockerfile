# syntax=docker/dockerfile:1
# One image for every command of dict-rate-limit-exporter: `exporter` (default), `receiver`, `migrate`,
# `all-in-one`, `simulator`, `check-config` — the arguments after the image name choose one.
#
# Ports (docs/deployment.md):
#   9090  METRICS_PORT       GET /metrics, / and /api/v1/policies (exporter); /metrics (receiver)
#   8080  HEALTH_CHECK_PORT  GET /health/live, /health/ready, /health/startup (exporter, receiver)
#   9097  RECEIVER_PORT      POST /alerts, the Alertmanager webhook (receiver)
#
# Build: docker build -t dict-rate-limit-exporter:0.1.0 .   (tests/test_dockerfile.py runs hadolint on this
# file and proves the two pip steps below in a clean virtualenv.)

# --- builder: the project and all its dependencies as wheels, nothing else
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
# exporter/history/sql is a symlink to sql/: the migrations are package data of the wheel.
COPY exporter/ exporter/
COPY sql/ sql/
RUN pip wheel --wheel-dir /wheels .

# --- runtime: python slim + the wheels, run as a fixed non-root UID
FROM python:3.11-slim
# The same version as pyproject.toml (tests/deploy/test_dockerfile.py checks it).
LABEL org.opencontainers.image.title="dict-rate-limit-exporter" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LISTEN_HOST=0.0.0.0 \
    LOG_FORMAT=json
# The wheels are bind-mounted from the builder, not copied: they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/dict_rate_limit_exporter-*.whl \
    && groupadd --system --gid 10001 dictrl \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin dictrl
WORKDIR /app
USER 10001:10001
EXPOSE 9090 8080 9097
# slim has no curl: the liveness check is a few lines of the image's own Python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HEALTH_CHECK_PORT', '8080') + '/health/live', timeout=4)"]
ENTRYPOINT ["dict-rate-limit"]
CMD ["exporter"]
