# The serving image: fewshot serve with ONNX Runtime, no torch. Two targets on one Python base:
#   cpu (the default, last stage):  docker build -t fewshot:cpu .
#   gpu (onnxruntime-gpu with NVIDIA's CUDA 13 and cuDNN 9 wheels from PyPI; the host needs the
#        NVIDIA driver, R580+, and the NVIDIA Container Toolkit, no CUDA install):
#                                    docker build --target gpu -t fewshot:gpu .
# Podman/Buildah: add --format docker, else the image is OCI and loses its HEALTHCHECK.
# The model served by default is models/default.onnx, copied in below; mount another and pass
# --model (or FEWSHOT_MODEL) to serve your own export.
# tests/test_container_images.py builds both targets and runs them (deploy/containers.md).

ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

# --- the base both targets share ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 fewshot && mkdir /data && chown fewshot /data

# --- the fewshot wheels: as published (cpu), and declaring onnxruntime-gpu (gpu) ----------------------
FROM python AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/image_requirements.py ./deploy/
COPY service ./service
COPY trainer ./trainer
RUN pip wheel --no-deps --wheel-dir /wheels/cpu . \
    && rm -rf build *.egg-info \
    && python deploy/image_requirements.py gpu pyproject.toml --rewrite \
    && pip wheel --no-deps --wheel-dir /wheels/gpu .

# --- the requirements, from pyproject.toml, before the code: rebuilt only when they change ------------
# OpenVINO runs the bf16 variant on this server's CPU and reads ONNX only: its Intel GPU and NPU
# plugins (with the GPU's kernel cache) and its other frameworks' readers are 75 MB never loaded.
FROM python AS cpu-requirements
COPY pyproject.toml constraints.txt deploy/image_requirements.py /tmp/requirements/
RUN cd /tmp/requirements \
    && python image_requirements.py cpu pyproject.toml > requirements.txt \
    && pip install -r requirements.txt -c constraints.txt \
    && cd / && rm -rf /tmp/requirements \
    && ov=$(python -c "import openvino, os; print(os.path.dirname(openvino.__file__))")/libs \
    && rm "$ov"/libopenvino_intel_gpu_plugin.so "$ov"/libopenvino_intel_npu_plugin.so "$ov"/cache.json \
        "$ov"/libopenvino_tensorflow_frontend.so.* "$ov"/libopenvino_tensorflow_lite_frontend.so.* \
        "$ov"/libopenvino_paddle_frontend.so.* "$ov"/libopenvino_pytorch_frontend.so.* "$ov"/libopenvino_gguf_frontend.so.*

FROM python AS gpu-requirements
COPY pyproject.toml constraints.txt deploy/image_requirements.py /tmp/requirements/
RUN cd /tmp/requirements \
    && python image_requirements.py gpu pyproject.toml > requirements.txt \
    && pip install -r requirements.txt -c constraints.txt \
    && cd / && rm -rf /tmp/requirements \
    && ov=$(python -c "import openvino, os; print(os.path.dirname(openvino.__file__))")/libs \
    && rm "$ov"/libopenvino_intel_gpu_plugin.so "$ov"/libopenvino_intel_npu_plugin.so "$ov"/cache.json \
        "$ov"/libopenvino_tensorflow_frontend.so.* "$ov"/libopenvino_tensorflow_lite_frontend.so.* \
        "$ov"/libopenvino_paddle_frontend.so.* "$ov"/libopenvino_pytorch_frontend.so.* "$ov"/libopenvino_gguf_frontend.so.*

# --- gpu: onnxruntime-gpu; the server preloads the CUDA/cuDNN wheels' libraries (providers.py) -------
FROM gpu-requirements AS gpu
COPY --from=wheels /wheels/gpu /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels && pip check
WORKDIR /app
COPY models ./models
# Providers chosen automatically: CUDA where a GPU is visible, else the CPU, and the log says so.
# FEWSHOT_PROVIDERS=cuda refuses to start without a GPU instead.
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

# --- cpu: onnxruntime (the default target) --------------------------------------------------------
FROM cpu-requirements AS cpu
COPY --from=wheels /wheels/cpu /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels && pip check
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
