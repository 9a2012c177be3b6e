#!/usr/bin/env bash
# Set up (first run only) and run the embedded glyph demo: bash scripts/demo.sh [normsoftmax demo flags]
set -euo pipefail
EXTRAS=timm
source "$(dirname "$0")/setup.sh"
exec "$VENV/bin/normsoftmax" demo "$@"
