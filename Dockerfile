# syntax=docker/dockerfile:1
# billing_service: build with uv from the lockfile, run as a non-root user. See deploy/README.md.

# --- build: resolve nothing, install exactly what uv.lock pins into /app/.venv -------------------------
FROM python:3.11-slim AS build
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first, in their own layer: a code change does not reinstall them.
# (The SDK is a workspace member, so the lockfile needs its pyproject to be present.)
COPY pyproject.toml uv.lock README.md ./
COPY clients/python/pyproject.toml clients/python/README.md clients/python/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project --no-install-workspace
COPY src ./src
COPY clients/python/src ./clients/python/src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package billing-service

# --- runtime: the virtualenv and nothing else -------------------------------------------------------
FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 billing \
 && useradd --system --uid 10001 --gid billing --home-dir /app --no-create-home billing
COPY --from=build --chown=root:root /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BILLING_LOG_FORMAT=json \
    BILLING_WORKERS=4 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/billing-metrics
WORKDIR /app
USER billing:billing
EXPOSE 8000
# Ready means "this replica answers and its database answers": what a load balancer should route on.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
# `exec` replaces the shell, so `billing serve` is PID 1 and gets SIGTERM for a graceful drain.
# Other commands: `docker run IMAGE billing migrate`, `... billing audit`.
CMD ["sh", "-c", "exec billing serve --host 0.0.0.0 --port 8000 --workers \"${BILLING_WORKERS}\""]
