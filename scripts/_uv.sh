# Sourced by the other scripts: puts a pinned uv on PATH, bootstrapping it from plain Python if needed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
UV_VERSION="0.13.9"
if ! command -v uv >/dev/null 2>&1; then
  if [ ! -x "$ROOT/.tools/bin/uv" ]; then
    PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { echo "billing_service needs Python 3.11 or newer" >&2; exit 1; }
    echo "bootstrapping uv $UV_VERSION into .tools/ ..." >&2
    "$PYTHON" -m venv "$ROOT/.tools"
    "$ROOT/.tools/bin/pip" install --quiet "uv==$UV_VERSION"
  fi
  export PATH="$ROOT/.tools/bin:$PATH"
fi
# The lockfile is the install: --frozen never re-resolves, so every machine gets the same versions.
uv sync --frozen --quiet --all-groups
