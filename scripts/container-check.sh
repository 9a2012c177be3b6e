#!/usr/bin/env bash
# Build the CPU image through the Dockerfile and smoke-test it, on a machine where containers can be built and
# executed with buildah's chroot isolation but not run by podman or docker (see the README, "Run in a container").
#
#   sudo bash scripts/container-check.sh            # as root: installs buildah and debootstrap if missing
#
# 1. a Debian bookworm base made here with debootstrap (the Debian archive is the one registry reachable), imported
#    as localhost/normsoftmax-base:bookworm;
# 2. the pinned torch and torchvision wheels put in ./wheels ($NORMSOFTMAX_WHEELS, or `pip download --no-deps` from
#    the indexes pip is configured with); the rest comes from PyPI inside the build. PyPI's torch is the CUDA
#    build, and it does not import without its NVIDIA libraries, so this CPU image carries them (the size says so);
#    with PyTorch's CPU index reachable, --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu avoids it;
# 3. `buildah bud --isolation chroot` on the Dockerfile with BASE=that base -- the file the GPU image is built from;
# 4. inside the image: `normsoftmax --help`, a tiny train + evaluate on generated images, and `normsoftmax serve`
#    answering /healthz.
# Prints the build time and the image size. Keeps its work in $NORMSOFTMAX_CHECK_DIR (default /tmp/normsoftmax-check).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
WORK="${NORMSOFTMAX_CHECK_DIR:-/tmp/normsoftmax-check}"
BASE_IMAGE="localhost/normsoftmax-base:bookworm"
IMAGE="localhost/normsoftmax:cpu"
STORAGE=(--storage-driver vfs)  # works without overlay support in the sandbox
say() { printf '\n== %s\n' "$*"; }
started=$(date +%s)

if [ "$(id -u)" != 0 ]; then
    echo "container-check: run as root (debootstrap and buildah's chroot isolation need it)" >&2
    exit 2
fi
missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
mkdir -p "$WORK"

# ---------------------------------------------------------------------------------------------- 1. the base
if ! buildah "${STORAGE[@]}" images --quiet "$BASE_IMAGE" >/dev/null 2>&1; then
    # the Debian mirror apt uses here (a deb822 URIs: line or a one-line deb entry; comments skipped)
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -n -E 's,^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)(https?://[^[:space:]]+/debian)/?([[:space:]].*)?$,\3,p' \
        | awk 'NR == 1' || true)
    mirror="${mirror:-http://deb.debian.org/debian}"
    say "debootstrap bookworm from $mirror"
    rm -rf "$WORK/rootfs"
    t0=$(date +%s)
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
    echo "debootstrap: $(( $(date +%s) - t0 )) s, $(du -sh "$WORK/rootfs" | cut -f1)"
    container=$(buildah "${STORAGE[@]}" from scratch)
    mountpoint=$(buildah "${STORAGE[@]}" mount "$container")
    tar -C "$WORK/rootfs" -c . | tar -C "$mountpoint" -x
    buildah "${STORAGE[@]}" umount "$container" >/dev/null
    buildah "${STORAGE[@]}" commit --quiet "$container" "$BASE_IMAGE" >/dev/null
    buildah "${STORAGE[@]}" rm "$container" >/dev/null
fi
echo "base image: $BASE_IMAGE"

# ---------------------------------------------------------------------------------------------- 2. the wheels
torch=$(sed -n 's/.*"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
vision=$(sed -n 's/.*"\(torchvision==[^"]*\)".*/\1/p' pyproject.toml)
if [ -n "${NORMSOFTMAX_WHEELS:-}" ]; then
    cp "$NORMSOFTMAX_WHEELS"/*.whl wheels/
fi
if ! ls wheels/torch-"${torch#torch==}"-*.whl >/dev/null 2>&1; then
    say "pip download $torch $vision (no dependencies) into ./wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 "$torch" "$vision" -d wheels
fi
echo "wheels: $(cd wheels && ls *.whl | tr '\n' ' ')"

# ---------------------------------------------------------------------------------------------- 3. the build
say "buildah bud --isolation chroot (BASE=$BASE_IMAGE)"
t0=$(date +%s)
# pip inside the build reaches PyPI through this machine's network: give it the CA bundle this machine trusts
# (a proxy here re-signs TLS), mounted for the build only.
ca=(); [ -f /etc/ssl/certs/ca-certificates.crt ] \
    && ca=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/pip-ca.pem:ro --build-arg PIP_CERT=/etc/pip-ca.pem)
buildah "${STORAGE[@]}" bud --isolation chroot --layers=false --build-arg BASE="$BASE_IMAGE" "${ca[@]}" \
    --build-arg EXTRAS=timm -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log" >&2; exit 1; }
build_seconds=$(( $(date +%s) - t0 ))
size=$(buildah "${STORAGE[@]}" images --format '{{.Size}}' "$IMAGE" | head -n 1)
base_size=$(buildah "${STORAGE[@]}" images --format '{{.Size}}' "$BASE_IMAGE" | head -n 1)
echo "built $IMAGE in $build_seconds s: $size (the base alone: $base_size)"

# ---------------------------------------------------------------------------------------------- 4. inside
container=$(buildah "${STORAGE[@]}" from "$IMAGE")
trap 'buildah "${STORAGE[@]}" rm "$container" >/dev/null 2>&1 || true' EXIT
inside() { buildah "${STORAGE[@]}" run --isolation chroot --user 1000:1000 "$container" -- "$@"; }

say "normsoftmax --help"
inside normsoftmax --help > "$WORK/help.txt"
head -n 5 "$WORK/help.txt"

say "a tiny train + evaluate on generated images"
inside python3 - <<'PYTHON'
import numpy as np
from pathlib import Path
from PIL import Image
root = Path("/work/data")
for label in range(8):
    (root / f"class{label}").mkdir(parents=True, exist_ok=True)
    for index in range(6):
        rng = np.random.default_rng([label, index])
        pixels = np.clip(rng.normal(30 * label, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"class{label}" / f"{index}.png")
print("8 classes x 6 images in /work/data")
PYTHON
inside normsoftmax train --dataset folder --dataset_root /work/data --run_dir /runs/tiny --model_name resnet18 \
    --weights none --dim 16 --batch_size 8 --images_per_class 2 --class_balancing --pretrain_epochs 1 \
    --epochs_per_step 1 --num_steps 1 --test_every_n_epochs 1 --resize 40 --crop 32 --workers 0 --no-progress \
    --amp none 2>&1 | tail -n 3
inside normsoftmax evaluate /runs/tiny --workers 0 --no-progress

say "normsoftmax serve answers /healthz"
inside bash -c '
set -e
normsoftmax embed /runs/tiny /work/data --out /work/all.npz --workers 0 --no-progress >/dev/null
normsoftmax index build /work/all.npz --out /work/index >/dev/null
normsoftmax serve /runs/tiny /work/index --port 8765 --device cpu >/work/serve.log 2>&1 &
server=$!
for attempt in $(seq 90); do
    if python3 -c "import json, urllib.request as r; print(json.load(r.urlopen(\"http://127.0.0.1:8765/healthz\"))[\"items\"], \"items: /healthz answers\")" 2>/dev/null; then
        kill $server; exit 0
    fi
    sleep 1
done
kill $server || true; cat /work/serve.log; exit 1'

say "container-check passed in $(( $(date +%s) - started )) s: image $IMAGE, $size, built in $build_seconds s"
