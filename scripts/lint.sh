#!/usr/bin/env bash
# Set up (first run only) and check the code: ruff's lint rules and mypy's types, as configured in
# pyproject.toml. Exits non-zero on any finding. bash scripts/lint.sh
set -euo pipefail
EXTRAS=test,timm,lint,milvus
source "$(dirname "$0")/setup.sh"
cd "$REPO"
"$VENV/bin/ruff" check src tests benchmarks
"$VENV/bin/mypy"
