# ┌──────────────────────────────────────────────────────────────────────────┐
# │ App image: gunicorn + uvicorn workers serving the ASGI app               │
# └──────────────────────────────────────────────────────────────────────────┘
# Two stages: `builder` makes /opt/venv from the hash-locked requirements; `runtime`
# gets that venv and the code, nothing else (no pip cache, no compiler, no lock file).
# Builds on the classic builder and on BuildKit alike (engine 20.10 without buildx has
# only the former), so no RUN --mount, no named contexts.
#
# Base image: any image with python3 and `python3 -m venv` on PATH; the official one by
# default, a local one where nothing can be pulled (scripts/base-images.sh):
#   docker build --build-arg PYTHON_IMAGE=localbase/python:trixie .
# Dependencies: from PyPI, or, when .cache/wheelhouse/ holds wheels
# (scripts/wheelhouse.sh), from there with --no-index. Both check the lock's hashes.
# https://docs.docker.com/build/building/best-practices/

ARG PYTHON_IMAGE=python:3.13-slim

# ── builder: the virtualenv ─────────────────────────────────────────────────────
FROM ${PYTHON_IMAGE} AS builder

# The glob makes the wheelhouse optional: with no wheels only the lock is copied.
COPY requirements/runtime.lock .cache/wheelhouse/*.whl /tmp/build/

# --no-deps: the lock is complete and universal; --require-hashes: nothing unlocked
# gets in. pip itself is removed afterwards: the runtime installs nothing.
RUN set -eu; python3 -m venv /opt/venv \
    && if ls /tmp/build/*.whl >/dev/null 2>&1; then \
           echo "installing from the wheelhouse"; \
           set -- --no-index --find-links /tmp/build; \
       else \
           echo "installing from the package index"; \
       fi \
    && /opt/venv/bin/python -m pip install \
           --no-cache-dir --disable-pip-version-check --no-input \
           --require-hashes --no-deps --only-binary=:all: "$@" \
           -r /tmp/build/runtime.lock \
    && /opt/venv/bin/python -m pip uninstall --yes --disable-pip-version-check pip \
    && rm -rf /tmp/build

# Wheels ship their compiled extensions with debug symbols (uvloop's loop.so: 16 MB, 1.8 MB
# stripped): --strip-unneeded keeps every symbol the dynamic loader and Python need. C and
# Cython sources and type stubs are for building and type checkers, never imported.
# binutils only here, in the builder (from the base's Debian when it lacks `strip`); the
# version does not matter: it only removes sections.
# hadolint ignore=DL3008
RUN set -eu; if ! command -v strip >/dev/null; then \
        apt-get update -qq && apt-get install -y -qq --no-install-recommends binutils >/dev/null; \
    fi \
    && find /opt/venv -name '*.so' -exec strip --strip-unneeded {} + \
    && find /opt/venv -type f \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pyi' \
           -o -name '*.c' -o -name '*.h' \) -delete

# ── runtime ────────────────────────────────────────────────────────────────────────
# Ordered for the layer cache: user and venv first (they change with the lock only),
# then code, then metadata and the per-build version last. Each instruction costs a
# container commit on the classic builder, so related settings share one.
FROM ${PYTHON_IMAGE} AS runtime

# A fixed uid so volumes and policies can name it; no home, no shell.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home \
           --home-dir /nonexistent --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv

# Code is owned by root and read-only for `app`; bytecode is compiled at build time
# because the root filesystem is read-only at run time.
COPY server/ /app/server/
COPY app/ /app/app/
RUN /opt/venv/bin/python -m compileall -q /app/server /app/app

WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus-multiproc
USER 10001:10001
EXPOSE 8000 9000

# Liveness only (no curl in slim images): the serving layer answers /healthz itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]

# Exec form. `python -m server` validates every setting (one line naming a bad variable,
# exit 78), then execs gunicorn with server/gunicorn_conf.py in its place: the gunicorn
# master is PID 1, so `docker stop`'s SIGTERM reaches it directly and starts the graceful
# shutdown (GRACEFUL_TIMEOUT < compose stop_grace_period).
ENTRYPOINT ["python", "-m", "server"]

ARG APP_VERSION=dev
ARG VCS_REF=unknown
ENV APP_VERSION=${APP_VERSION}
LABEL org.opencontainers.image.title="asgi-app" \
      org.opencontainers.image.description="Python ASGI service: gunicorn + uvicorn workers, Prometheus metrics" \
      org.opencontainers.image.version="${APP_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}"
