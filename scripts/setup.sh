# Sourced by demo.sh and test.sh: creates .venv beside the repository (once) and installs the package into it
# (again only when pyproject.toml or the wanted extras change).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NORMSOFTMAX_VENV:-$REPO/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi
STAMP="$VENV/.normsoftmax-installed-$(cat "$REPO/pyproject.toml" <(echo "$EXTRAS") | sha256sum | cut -c1-16)"
if [ ! -e "$STAMP" ]; then
    # torch and torchvision are pinned in pyproject.toml (torch==2.14.1, torchvision==0.29.1); pip, not uv or
    # poetry, finds them on machines that keep them on local disk.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e "$REPO[$EXTRAS]"
    touch "$STAMP"
fi
