# normsoftmax in a container: the GPU image by default, a CPU image through the same file.
#
#   GPU (default):  docker build -t normsoftmax:gpu .
#                   docker run --gpus all -v "$PWD":/work -v "$PWD/data":/data normsoftmax:gpu train ...
#   CPU:            docker build -t normsoftmax:cpu --build-arg BASE=python:3.11-slim-bookworm \
#                                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# Build arguments:
#   BASE             the base image: a CUDA runtime (default; torch's CUDA libraries come from its own wheels, the
#                    base brings the CUDA user-space a GPU container expects) or any Debian/Ubuntu image for a CPU
#                    image (python3 is installed from its archive when the base lacks it)
#   TORCH_INDEX_URL  the package index torch and torchvision come from (PyTorch's CPU index for a CPU image);
#                    empty: PyPI, whose Linux torch is the CUDA build with its NVIDIA libraries (several GB)
#   EXTRAS           the package's extras (default timm,milvus)
#   PIP_CERT         a CA bundle pip trusts while building (behind a TLS-intercepting proxy; see below)
# Wheels placed in ./wheels/ (git-ignored) are offered to pip first: a machine without PyPI's torch builds from
# them. Everything a user keeps -- the working folder, data, runs, caches -- lives on volumes, not in the image.

ARG BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ------------------------------------------------------------------------------------------ build
FROM ${BASE} AS build
ARG TORCH_INDEX_URL=
ARG EXTRAS=timm,milvus
# A CA bundle for pip inside the build (a TLS-intercepting proxy's), mounted by the builder, e.g.
# buildah bud -v /etc/ssl/certs/ca-certificates.crt:/etc/pip-ca.pem:ro --build-arg PIP_CERT=/etc/pip-ca.pem;
# unset when not given. Only the build stage sees it.
ARG PIP_CERT
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/normsoftmax
COPY wheels/ /wheels/
COPY pyproject.toml README.md /src/
COPY src/ /src/src/
# torch first (from ./wheels, or the torch index when given: PyTorch's CPU index for a CPU image), then the package,
# which then finds torch satisfied.
RUN set -eu; \
    torch=$(sed -n 's/.*"\(torch==[^"]*\)".*/\1/p' /src/pyproject.toml); \
    vision=$(sed -n 's/.*"\(torchvision==[^"]*\)".*/\1/p' /src/pyproject.toml); \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        /opt/normsoftmax/bin/pip install --find-links /wheels --index-url "$TORCH_INDEX_URL" "$torch" "$vision"; \
    else \
        /opt/normsoftmax/bin/pip install --find-links /wheels "$torch" "$vision"; \
    fi; \
    /opt/normsoftmax/bin/pip install --find-links /wheels "/src[$EXTRAS]"; \
    /opt/normsoftmax/bin/python -c "import normsoftmax, torch; print('normsoftmax', normsoftmax.__version__, 'torch', torch.__version__)"; \
    find /opt/normsoftmax -name __pycache__ -prune -exec rm -rf {} +

# ------------------------------------------------------------------------------------------ runtime
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --create-home --shell /bin/bash normsoftmax) \
 && mkdir -p /work /data /runs /cache \
 && chown 1000:1000 /work /data /runs /cache
COPY --from=build /opt/normsoftmax /opt/normsoftmax
# Caches (torch hub, Hugging Face, matplotlib) on the /cache volume; nothing a user cares about in the image.
ENV PATH=/opt/normsoftmax/bin:$PATH HOME=/cache XDG_CACHE_HOME=/cache TORCH_HOME=/cache/torch \
    HF_HOME=/cache/huggingface MPLCONFIGDIR=/cache/matplotlib PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /work
VOLUME ["/work", "/data", "/runs", "/cache"]
EXPOSE 8000
ENTRYPOINT ["normsoftmax"]
CMD ["--help"]
