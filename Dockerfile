# windowlm: the OpenAI-compatible server in an image for NVIDIA GPU hosts (it runs on CPU-only hosts too: the
# device is `auto`). How to run it: docker/README.md.
#
#   docker build -t windowlm:0.1.0 .
#   docker run --gpus all -p 8000:8000 --stop-timeout 45 windowlm:0.1.0
#
# The base: Debian bookworm's slim Python 3.11, pinned to a patch release, rather than an nvidia/cuda
# *-cudnn-runtime image. torch's Linux wheels bring their own CUDA runtime, cuBLAS, cuDNN and NCCL as pip
# packages (nvidia-*, cuda-toolkit) and load those, not the system's; a CUDA base image would only add a second,
# unused copy of the same libraries (~3 GB). The host needs the NVIDIA driver and the NVIDIA Container Toolkit
# (`--gpus all`), nothing else. docker/smoke.sh builds this file for real with a debootstrapped bookworm standing
# in for this base (same Debian release, same Python minor version).
FROM python:3.11.13-slim-bookworm

# torch goes in first, on its own. By default pip takes it from its own configured index: torch 2.13.0 for Linux
# x86_64 on PyPI is the CUDA 13.0 build (NVIDIA driver >= 580). For an older driver pick another CUDA build from an
# index that serves PyTorch's builds, e.g.
#   --build-arg TORCH_INDEX_URL=<that index's CUDA 12.6 URL> --build-arg TORCH_SPEC=torch==2.13.0+cu126
# and for a small CPU-only image the CPU build (spec torch==2.13.0+cpu, from that index's CPU URL) or a wheel file
# mounted into the build (docker/smoke.sh does that). An empty TORCH_INDEX_URL passes no --index-url to pip.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""

LABEL org.opencontainers.image.title="windowlm" \
      org.opencontainers.image.description="OpenAI-compatible inference server for local-attention language models" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The unprivileged user the server runs as (numeric, so Kubernetes' runAsNonRoot can check it), the venv, and
# /weights: the documented mount point for your own checkpoint (mount it read-only, set WINDOWLM_WEIGHTS=/weights).
RUN groupadd --system --gid 10001 windowlm \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/windowlm --create-home \
        --shell /usr/sbin/nologin windowlm \
    && mkdir -p /weights \
    && python3 -m venv /opt/venv

WORKDIR /opt/windowlm

# The dependency layer: only pyproject.toml is copied, so a change to the source does not reinstall torch. It
# installs the project's dependencies and its build requirements (so the source installs below without network).
# A CA bundle for a TLS-intercepting proxy can be handed in as the build secret `pip_ca`
# (`--secret id=pip_ca,src=/path/ca.crt`): it is mounted for this step only and PIP_CERT is exported only here,
# so neither ends up in the image.
COPY pyproject.toml /tmp/deps/pyproject.toml
# DL3013 (pin versions in pip) is ignored for this step only: the one package it flags is "${TORCH_SPEC}", a build
# argument whose default is pinned (torch==2.13.0); hadolint cannot see through the variable. The other
# dependencies are installed with --requirement from pyproject.toml.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_ca \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb")); print(*p["project"]["dependencies"], *p["build-system"]["requires"], sep="\n")' \
        /tmp/deps/pyproject.toml > /tmp/deps/requirements.txt \
    && pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} "${TORCH_SPEC}" \
    && pip install --no-cache-dir --requirement /tmp/deps/requirements.txt \
    && rm -rf /tmp/deps

# The bundled model (weights/build_default.sh makes it): its own layer, changed less often than the code.
COPY weights/default/ /opt/windowlm/weights/default/

# The source last. Installing it needs no network: no dependencies, and the build requirements are in the venv.
COPY pyproject.toml README.md /opt/windowlm/src/
COPY model/ /opt/windowlm/src/model/
COPY server/ /opt/windowlm/src/server/
COPY weights/*.py /opt/windowlm/src/weights/
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/windowlm/src \
    && rm -rf /opt/windowlm/src/build /opt/windowlm/src/*.egg-info

# Every setting is a WINDOWLM_* variable (docker run -e WINDOWLM_MAX_BATCH_SIZE=64 ...) and a flag appended to
# the command (docker run IMAGE --max-batch-size 64); flags win. The host is set here rather than as a flag in
# ENTRYPOINT so that WINDOWLM_HOST can still change it. Change the port with WINDOWLM_PORT (not --port): the
# HEALTHCHECK reads it.
ENV WINDOWLM_WEIGHTS=/opt/windowlm/weights/default \
    WINDOWLM_HOST=0.0.0.0 \
    WINDOWLM_PORT=8000 \
    WINDOWLM_DEVICE=auto

USER 10001:10001
EXPOSE 8000

# /health is 200 while the process and the engine live (also while the weights load); the image's own Python
# asks for it, so no curl is installed for this.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WINDOWLM_PORT', '8000'), timeout=4)"]

# SIGTERM starts the drain: /ready turns 503, streams in flight finish within WINDOWLM_DRAIN_TIMEOUT (30 s), then
# the server exits 0. Give the container longer than that to stop (docker run --stop-timeout 45, compose's
# stop_grace_period, Kubernetes' terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM

ENTRYPOINT ["windowlm", "serve"]
