# syntax=docker/dockerfile:1
# One image for the Moirai operator, stage servers and gateway; a GPU variant for GPU pools.
#
#   docker build -t moirai:0.1.0 .                         # CPU: the default (last) stage
#   docker build -t moirai:0.1.0-gpu --target gpu .        # onnxruntime-gpu on a CUDA runtime
#
# Entry points, all from the same virtual environment in /opt/moirai:
#   kopf run --standalone -m moirai_operator.handlers ...  the operator (the chart's command)
#   moirai stage ... / moirai gateway ...                  stage server, gateway
#   python -m moirai_operator.fetch URI DEST [--sha256 X]  init container: fetch and verify
#
# Build stages compile wheels of the project and every dependency (one Python version per
# variant: the CUDA base is Ubuntu 24.04 with Python 3.12); runtime stages install only those
# wheels, offline, and run as the unprivileged user 10001, the UID that the operator's pod
# templates and the chart's securityContext name.

ARG CPU_PYTHON=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------- wheels, per variant
FROM python:${CPU_PYTHON}-slim AS wheels-cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY moirai/ moirai/
COPY stage_server/ stage_server/
COPY operator/ operator/
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[cpu]"

FROM python:3.12-slim AS wheels-gpu
WORKDIR /src
COPY --from=wheels-cpu /src /src
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[gpu]"

# ------------------------------------------------------------------------------ GPU runtime
FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/moirai/bin:$PATH
# The base image's distribution pins the Python 3.12 package; take its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 moirai \
 && useradd --system --uid 10001 --gid moirai --no-create-home --shell /usr/sbin/nologin moirai
RUN --mount=type=bind,from=wheels-gpu,source=/wheels,target=/wheels \
    python3.12 -m venv /opt/moirai \
 && /opt/moirai/bin/pip install --no-cache-dir --no-index --find-links=/wheels "moirai[gpu]"
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001 50051
CMD ["moirai", "--help"]

# ---------------------------------------------------------------- CPU runtime (the default)
FROM python:${CPU_PYTHON}-slim AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/moirai/bin:$PATH
RUN groupadd --system --gid 10001 moirai \
 && useradd --system --uid 10001 --gid moirai --no-create-home --shell /usr/sbin/nologin moirai
RUN --mount=type=bind,from=wheels-cpu,source=/wheels,target=/wheels \
    python -m venv /opt/moirai \
 && /opt/moirai/bin/pip install --no-cache-dir --no-index --find-links=/wheels "moirai[cpu]"
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001 8080 50051
CMD ["kopf", "run", "--standalone", "--liveness=http://0.0.0.0:8080/healthz", "--all-namespaces", "-m", "moirai_operator.handlers"]
