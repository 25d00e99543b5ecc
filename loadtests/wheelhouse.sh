#!/usr/bin/env bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ Wheelhouse of the Locust image: locked wheels downloaded on the host     │
# └──────────────────────────────────────────────────────────────────────────┘
# Same reason and mechanism as the app's (scripts/wheelhouse.sh): the classic builder's RUN
# steps may not reach PyPI, the host's pip can. loadtests/Dockerfile installs from
# loadtests/.wheelhouse/*.whl with --no-index --require-hashes when the folder has wheels,
# from PyPI otherwise.
# Usage: loadtests/wheelhouse.sh [--clean]    Env: WHEELHOUSE_PYTHON_VERSION (default 3.13)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WHEELHOUSE_LOCK=$HERE/requirements.lock WHEELHOUSE_DIR=$HERE/.wheelhouse \
    exec bash "$HERE/../scripts/wheelhouse.sh" "$@"
