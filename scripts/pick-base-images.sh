#!/usr/bin/env bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ Which base images to build on: the configured ones, or local ones        │
# └──────────────────────────────────────────────────────────────────────────┘
# `make up`, `make up-monitoring` and `make deploy` build images FROM the base images the
# compose file names (PYTHON_IMAGE, NGINX_IMAGE, ...: the official ones unless set). On a
# machine that cannot pull them (no registry, air-gapped) the build would fail; this
# script notices first, says so in one line, builds the Debian look-alikes and the
# wheelhouse (scripts/base-images.sh, scripts/wheelhouse.sh; cached, ~1 s when done) and
# prints the variables that point the build at them.
#
#   env $(scripts/pick-base-images.sh) docker compose up --build ...
#
# stdout: NAME=value words for `env` (nothing when the configured images are usable).
# stderr: what it decided and why, for people.
# How it decides: every base image the compose services build FROM is present locally
# (`docker image inspect`), or the first missing one can be pulled (a bounded attempt,
# PULL_TIMEOUT seconds). BASE=local skips the check and uses the local images; BASE=
# official skips it and uses the configured ones.
# Usage: scripts/pick-base-images.sh [compose profile ...]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PULL_TIMEOUT=${PULL_TIMEOUT:-60}
# The local image standing in for each base-image build argument.
declare -A LOCAL=(
    [PYTHON_IMAGE]=localbase/python:trixie
    [NGINX_IMAGE]=localbase/nginx:trixie
    [PROMETHEUS_IMAGE]=localbase/prometheus:trixie
    [NGINX_EXPORTER_IMAGE]=localbase/nginx-exporter:trixie
)

log() { printf '[base-images] %s\n' "$*" >&2; }

use_local() {
    bash "$ROOT/scripts/base-images.sh" >&2
    bash "$ROOT/scripts/wheelhouse.sh" >&2
    for name in "${!LOCAL[@]}"; do printf '%s=%s\n' "$name" "${LOCAL[$name]}"; done | sort
}

case ${BASE:-} in
    local) use_local; exit 0 ;;
    official|"") ;;
    *) log "BASE=${BASE} is invalid: expected local, official or unset (detect)"; exit 2 ;;
esac

profiles=()
for profile in "$@"; do profiles+=(--profile "$profile"); done
# The base images the services need, as the compose file resolves them with this
# environment and .env: build arguments named *_IMAGE, and images used as they are
# when a variable with a local stand-in names them (the nginx exporter).
wanted=$(cd "$ROOT" && python3 - "${!LOCAL[@]}" -- "${profiles[@]}" <<'PY'
import json, re, subprocess, sys

names = set(sys.argv[1:sys.argv.index("--")])
compose = ["docker", "compose", *sys.argv[sys.argv.index("--") + 1:], "config", "--format", "json"]
resolved = json.loads(subprocess.run(compose, check=True, capture_output=True, text=True).stdout)
raw = json.loads(subprocess.run([*compose, "--no-interpolate"], check=True, capture_output=True, text=True).stdout)
for name, service in resolved["services"].items():
    for arg, value in ((service.get("build") or {}).get("args") or {}).items():
        if arg in names:
            print(value)
    variable = re.match(r"^\$\{(\w+)", raw["services"][name].get("image", ""))
    if "build" not in service and variable and variable[1] in names:
        print(service["image"])
PY
)
wanted=$(sort -u <<<"$wanted")

missing=()
for image in $wanted; do
    docker image inspect "$image" >/dev/null 2>&1 || missing+=("$image")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0  # all present: nothing to pull, nothing to say
fi
if [[ ${BASE:-} == official ]]; then
    exit 0  # the build pulls them (and fails loudly if it cannot)
fi
if timeout "$PULL_TIMEOUT" docker pull --quiet "${missing[0]}" >/dev/null 2>&1; then
    exit 0  # the registry is reachable: the build pulls the rest
fi
log "cannot pull ${missing[0]} (no registry reachable): building local base images from Debian and the wheelhouse instead"
use_local
