# One image for the Moirai operator, stage servers and gateway; a GPU variant for GPU pools.
#
#   hack/image/build.sh [cpu|gpu] [TAG]        what `make image` runs: the arguments below filled in
#   docker build -t moirai:0.1.0 .                       # CPU: the default (last) stage
#   docker build -t moirai:0.1.0-gpu --target gpu .      # onnxruntime-gpu on a CUDA runtime
#
# Build arguments:
#   BASE_IMAGE  base of the CPU image: Debian or Ubuntu with python3 (>= 3.11) and its venv
#               module. Default python:3.11-slim; where no image registry can be reached,
#               hack/image/base.sh makes an equivalent one from Debian's packages.
#   CUDA_IMAGE  base of the GPU image, which gets python3 and python3-venv from its distribution
#               (Ubuntu 24.04: Python 3.12). Its CUDA and cuDNN must be those onnxruntime-gpu is
#               built for (1.31: CUDA 13, cuDNN 9), or the CUDA provider cannot load.
# The builds download Moirai's dependencies from PyPI. Where that needs a CA bundle the base
# image lacks (a proxy's), pass it as the build secret `ca`:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
# RUN --mount needs BuildKit: Docker 23 or later, or DOCKER_BUILDKIT=1 before that.
#
# Entry points, all from the same virtual environment in /opt/moirai:
#   kopf run --standalone -m moirai_operator.handlers ...  the operator (the chart's command)
#   moirai stage ... / moirai gateway ...                  stage server, gateway
#   python -m moirai_operator.fetch URI DEST [--sha256 X]  init container: fetch and verify
#   python -m moirai_operator.upload FILE                  profiling Job: deliver the profile
#
# Each variant installs Moirai's dependencies in a virtual environment in a build stage (a layer
# that changes only with pyproject.toml) and builds Moirai's wheel in another; its runtime stage
# copies that environment onto the same base and installs the wheel in a small layer, so that a
# change of Moirai's code rebuilds megabytes, not the whole environment. Runtime stages run as the unprivileged user
# 10001, the UID that the operator's pod templates and the chart's securityContext name.

ARG BASE_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ------------------------------------------------------------------------------- bases
FROM ${BASE_IMAGE} AS cpu-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/moirai/bin:$PATH
RUN groupadd --system --gid 10001 moirai \
 && useradd --system --uid 10001 --gid moirai --no-create-home --shell /usr/sbin/nologin moirai

FROM ${CUDA_IMAGE} AS gpu-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/moirai/bin:$PATH
# The distribution's Python, with its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 moirai \
 && useradd --system --uid 10001 --gid moirai --no-create-home --shell /usr/sbin/nologin moirai

# ------------------------------------------------------------- virtual environments
FROM cpu-base AS venv-cpu
WORKDIR /src
COPY pyproject.toml ./
# Dependencies only: the project's packages are empty folders here.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && mkdir -p moirai stage_server operator/moirai_operator && touch README.md \
 && python3 -m venv /opt/moirai \
 && /opt/moirai/bin/pip install --no-cache-dir ".[cpu]"

# Moirai's own wheel, installed by the runtime stage in a small layer of its own.
FROM venv-cpu AS wheel-cpu
COPY README.md ./
COPY moirai/ moirai/
COPY stage_server/ stage_server/
COPY operator/ operator/
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && /opt/moirai/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM gpu-base AS venv-gpu
WORKDIR /src
COPY pyproject.toml ./
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && mkdir -p moirai stage_server operator/moirai_operator && touch README.md \
 && python3 -m venv /opt/moirai \
 && /opt/moirai/bin/pip install --no-cache-dir ".[gpu]"

# Moirai's own wheel, installed by the runtime stage in a small layer of its own.
FROM venv-gpu AS wheel-gpu
COPY README.md ./
COPY moirai/ moirai/
COPY stage_server/ stage_server/
COPY operator/ operator/
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && /opt/moirai/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ------------------------------------------------------------------------ GPU runtime
FROM gpu-base AS gpu
LABEL dev.moirai.image=gpu
COPY --from=venv-gpu /opt/moirai /opt/moirai
RUN --mount=type=bind,from=wheel-gpu,source=/wheels,target=/wheels \
    /opt/moirai/bin/pip install --no-cache-dir --no-deps --no-index --force-reinstall /wheels/*.whl
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001 50051 50052
CMD ["moirai", "--help"]

# -------------------------------------------------------------- CPU runtime (the default)
FROM cpu-base AS cpu
LABEL dev.moirai.image=cpu
COPY --from=venv-cpu /opt/moirai /opt/moirai
RUN --mount=type=bind,from=wheel-cpu,source=/wheels,target=/wheels \
    /opt/moirai/bin/pip install --no-cache-dir --no-deps --no-index --force-reinstall /wheels/*.whl
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001 8080 8081 50051 50052
CMD ["kopf", "run", "--standalone", "--liveness=http://0.0.0.0:8080/healthz", "--all-namespaces", "-m", "moirai_operator.handlers"]
