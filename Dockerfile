# syntax=docker/dockerfile:1
# STRIDE attribution service. CPU by default; for CUDA:
#   docker build --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t stride:cuda .
# The model and the operator store are mounted (see docker-compose.yml); nothing is downloaded at start.
ARG BASE=python:3.11-slim
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${BASE} AS build
ARG TORCH
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# CUDA bases ship without Python; python:* bases already have it
RUN command -v python3 >/dev/null || (apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index that matches the base, so the project's `torch>=2.4` adds nothing
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stride stride
COPY worker worker
COPY app app
RUN pip install . && pip check
# compile the numba solver once into the installed package's cache, so a fresh container's first query
# does not pay it (20-50 s on 2 cores); the runtime image is read-only in deploy/
RUN python -c "import torch; from stride.design import random_design; from stride.recovery import SparseDesign, solve; \
    solve(SparseDesign(random_design(64, 16, 2, 0)), torch.randn(16, 1))"

FROM ${BASE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN command -v python3 >/dev/null || (apt-get update && apt-get install -y --no-install-recommends \
        python3 && rm -rf /var/lib/apt/lists/*)
RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin stride \
    && mkdir -p /data && chown stride:stride /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    STRIDE_STORE=/data/store
USER stride
WORKDIR /home/stride
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["stride", "serve", "--host", "0.0.0.0", "--port", "8000"]
