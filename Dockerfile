# The spotserve image: every service (`python -m services.<name>`) and the `spotserve` CLI.
#
#   docker build -t spotserve .                                   # CPU build of torch
#   docker build -t spotserve:gpu --build-arg TORCH=torch \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# No credentials are baked in: `spotserve security init` draws them at the first start of a
# deployment (compose.yaml's `init` service) into a volume.

# Any image with Python >= 3.11 as `python3` (and its venv module). The CUDA builds of torch
# bring their CUDA libraries with them, so python:3.11-slim serves GPUs too (the NVIDIA
# container toolkit supplies the driver).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# torch first, in its own layer: the CPU build by default (keeps the image small); GPU users
# pass their CUDA index (and TORCH=torch, or a version their index has). Empty TORCH: let
# `pip install .` pick torch from PyPI.
ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/spotserve \
    PATH=/opt/spotserve/bin:$PATH

RUN python3 -m venv /opt/spotserve \
    && if [ -n "$TORCH" ]; then pip install "$TORCH" --index-url "$TORCH_INDEX_URL"; fi

COPY pyproject.toml README.md /tmp/src/
COPY shared /tmp/src/shared
COPY services /tmp/src/services
COPY loadgen /tmp/src/loadgen
COPY bench /tmp/src/bench
RUN pip install /tmp/src && rm -rf /tmp/src

# A non-root user. The directories that compose mounts volumes on belong to it, so the
# volumes start out owned by it: `init` (this user too) writes the secrets there with mode
# 0600 and every service (this user) can read its own password file.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/spotserve spotserve \
    && mkdir -p /secrets /var/lib/spotserve \
    && chown spotserve:spotserve /secrets /var/lib/spotserve
USER spotserve
WORKDIR /home/spotserve
# Models, profiles, the loader's disk tier: a volume in compose.yaml.
ENV SPOTSERVE_HOME=/var/lib/spotserve \
    SPOTSERVE_LOG__JSON_OUTPUT=true

CMD ["spotserve", "--help"]
