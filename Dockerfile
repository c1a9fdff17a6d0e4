# syntax=docker/dockerfile:1
# The serving image: fewshot serve with ONNX Runtime, no torch. Two targets:
#   cpu (the default, last stage):  docker build -t fewshot:cpu .
#   gpu (onnxruntime-gpu, CUDA 12 + cuDNN 9 from NVIDIA's runtime image):
#                                    docker build --target gpu -t fewshot:gpu .
# The model served by default is models/default.onnx, copied in below; mount another and pass
# --model (or FEWSHOT_MODEL) to serve your own export.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG ONNXRUNTIME_GPU_VERSION=1.22.0

# --- the fewshot wheel, built once for both targets ------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- gpu: NVIDIA's CUDA/cuDNN runtime + onnxruntime-gpu in a venv -----------------------------------
FROM ${CUDA_IMAGE} AS gpu
ARG ONNXRUNTIME_GPU_VERSION
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY --from=wheel /wheels /wheels
# The CPU onnxruntime that the wheel depends on and onnxruntime-gpu share one import name:
# replace the one with the other.
RUN pip install /wheels/*.whl \
    && pip uninstall -y onnxruntime \
    && pip install "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && rm -rf /wheels
RUN useradd --create-home --uid 10001 fewshot && mkdir /data && chown fewshot /data
WORKDIR /app
COPY models ./models
# CUDA first, CPU when no GPU is visible (ONNX Runtime falls back by itself).
ENV FEWSHOT_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    FEWSHOT_HOST=0.0.0.0 \
    FEWSHOT_DATA_DIR=/data
USER fewshot
VOLUME /data
EXPOSE 50051 8000
# Healthy = ready: model loaded and Redis answering (/readyz is 503 otherwise, which urlopen raises).
# With FEWSHOT_TLS_CERT it asks over HTTPS (its own certificate, so unverified; not under mTLS).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as u; tls = bool(os.environ.get('FEWSHOT_TLS_CERT')); u.urlopen('%s://127.0.0.1:%s/readyz' % ('https' if tls else 'http', os.environ.get('FEWSHOT_HTTP_PORT', '8000')), timeout=3, context=ssl._create_unverified_context() if tls else None)"]
ENTRYPOINT ["fewshot", "serve"]

# --- cpu: slim Python + onnxruntime (the default target) --------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
RUN useradd --create-home --uid 10001 fewshot && mkdir /data && chown fewshot /data
WORKDIR /app
COPY models ./models
ENV FEWSHOT_HOST=0.0.0.0 \
    FEWSHOT_DATA_DIR=/data
USER fewshot
VOLUME /data
EXPOSE 50051 8000
# Healthy = ready: model loaded and Redis answering (/readyz is 503 otherwise, which urlopen raises).
# With FEWSHOT_TLS_CERT it asks over HTTPS (its own certificate, so unverified; not under mTLS).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as u; tls = bool(os.environ.get('FEWSHOT_TLS_CERT')); u.urlopen('%s://127.0.0.1:%s/readyz' % ('https' if tls else 'http', os.environ.get('FEWSHOT_HTTP_PORT', '8000')), timeout=3, context=ssl._create_unverified_context() if tls else None)"]
ENTRYPOINT ["fewshot", "serve"]
