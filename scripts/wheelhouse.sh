#!/usr/bin/env bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ Wheelhouse: the app image's Python dependencies, downloaded on the host  │
# └──────────────────────────────────────────────────────────────────────────┘
# Why: the app image build runs on the classic builder (engine 20.10, no buildx), so it
# has no cache mounts, secrets or extra build contexts, and its RUN steps may not reach
# PyPI (no network, or a TLS-intercepting proxy whose CA the base image does not trust;
# both happen on CI here). The host's pip, which is configured for this network,
# downloads the exact locked wheels instead; the Dockerfile copies
# .cache/wheelhouse/*.whl from the build context and installs them with --no-index
# --require-hashes. Without a wheelhouse the same Dockerfile installs from PyPI.
#
# The wheels are for the image's interpreter, not the host's: CPython 3.13, manylinux
# x86_64 (glibc >= 2.17; trixie and python:3.13-slim have 2.41). The folder is rebuilt
# when requirements/runtime.lock or the target changes, so it never holds stale wheels.
#
# Usage: scripts/wheelhouse.sh [--clean]
# Env:   WHEELHOUSE_PYTHON_VERSION (default 3.13), WHEELHOUSE_DIR (default .cache/wheelhouse),
#        WHEELHOUSE_LOCK (default requirements/runtime.lock; loadtests/wheelhouse.sh passes its own)
# Docs:  https://pip.pypa.io/en/stable/cli/pip_download/
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCK=${WHEELHOUSE_LOCK:-$ROOT/requirements/runtime.lock}
PYVER=${WHEELHOUSE_PYTHON_VERSION:-3.13}
DEST=${WHEELHOUSE_DIR:-$ROOT/.cache/wheelhouse}
STAMP=$DEST.stamp   # beside the folder, so it is not in the build context
PLATFORMS=(manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

log() { printf '[wheelhouse] %s\n' "$*" >&2; }

if [[ ${1:-} == --clean ]]; then
    rm -rf "$DEST" "$STAMP"
    log "removed $DEST"
    exit 0
fi

# Prefer the project's venv pip (it is what `make` uses); fall back to python3 -m pip.
PIP=("$ROOT/.venv/bin/python" -m pip)
[[ -x $ROOT/.venv/bin/python ]] || PIP=(python3 -m pip)

key=$( { sha256sum "$LOCK" | cut -d' ' -f1; echo "cp$PYVER ${PLATFORMS[*]}"; } | sha256sum | cut -c1-16)
if [[ -f $STAMP && $(cat "$STAMP") == "$key" ]] && compgen -G "$DEST/*.whl" >/dev/null; then
    log "up to date ($(find "$DEST" -name '*.whl' | wc -l) wheels in $DEST, key $key)"
    exit 0
fi

start=$(date +%s.%N)
rm -rf "$DEST" "$STAMP"
mkdir -p "$DEST"
[[ -f $ROOT/.cache/.gitignore ]] || echo '*' >"$ROOT/.cache/.gitignore"  # the cache is never committed
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
# --no-deps: the lock is complete; --require-hashes: every wheel is checked against it.
# PIP_FIND_LINKS is cleared so a host-local wheel folder cannot leak into the set.
PIP_FIND_LINKS='' "${PIP[@]}" download \
    --disable-pip-version-check --no-deps --require-hashes \
    --only-binary=:all: "${platform_args[@]}" \
    --python-version "$PYVER" --implementation cp \
    -r "$LOCK" -d "$DEST" >&2
echo "$key" >"$STAMP"
log "$(find "$DEST" -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST ($(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s)"
