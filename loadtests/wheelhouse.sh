#!/usr/bin/env bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ Wheelhouse of the Locust image: locked wheels downloaded on the host     │
# └──────────────────────────────────────────────────────────────────────────┘
# Same reason as scripts/wheelhouse.sh (the app's): the classic builder's RUN steps may
# not reach PyPI, the host's pip can. loadtests/Dockerfile installs from
# loadtests/.wheelhouse/*.whl with --no-index --require-hashes when the folder has wheels,
# from PyPI otherwise. Wheels for the image's interpreter: CPython 3.13, manylinux x86_64.
# Usage: loadtests/wheelhouse.sh [--clean]    Env: WHEELHOUSE_PYTHON_VERSION (default 3.13)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOCK=$HERE/requirements.lock
PYVER=${WHEELHOUSE_PYTHON_VERSION:-3.13}
DEST=$HERE/.wheelhouse
STAMP=$DEST/.stamp
PLATFORMS=(manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

log() { printf '[loadtest wheelhouse] %s\n' "$*" >&2; }

if [[ ${1:-} == --clean ]]; then
    rm -rf "$DEST"
    log "removed $DEST"
    exit 0
fi

PIP=("$HERE/../.venv/bin/python" -m pip)
[[ -x $HERE/../.venv/bin/python ]] || PIP=(python3 -m pip)

key=$( { sha256sum "$LOCK" | cut -d' ' -f1; echo "cp$PYVER ${PLATFORMS[*]}"; } | sha256sum | cut -c1-16)
if [[ -f $STAMP && $(cat "$STAMP") == "$key" ]] && compgen -G "$DEST/*.whl" >/dev/null; then
    log "up to date ($(find "$DEST" -name '*.whl' | wc -l) wheels)"
    exit 0
fi
rm -rf "$DEST"
mkdir -p "$DEST"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
PIP_FIND_LINKS='' "${PIP[@]}" download \
    --disable-pip-version-check --no-deps --require-hashes \
    --only-binary=:all: "${platform_args[@]}" \
    --python-version "$PYVER" --implementation cp \
    -r "$LOCK" -d "$DEST" >&2
echo "$key" >"$STAMP"
log "$(find "$DEST" -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
