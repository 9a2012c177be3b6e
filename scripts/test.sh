#!/usr/bin/env bash
# Set up (first run only) and run the test suite: bash scripts/test.sh [pytest flags]
set -euo pipefail
EXTRAS=test,timm,lint,milvus  # the same environment as scripts/lint.sh: one install for both
source "$(dirname "$0")/setup.sh"
cd "$REPO"
exec "$VENV/bin/python" -m pytest -n 2 -q "$@"
