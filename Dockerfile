# effpose profiler agent. CPU image by default; the lut-gpu service of docker-compose.yml builds the
# CUDA variant with --build-arg TORCH_INDEX_URL=... --build-arg ORT_PACKAGE=onnxruntime-gpu.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG ORT_PACKAGE=onnxruntime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    EFFPOSE_DB_URL=sqlite:////data/agent.db \
    EFFPOSE_HOST=0.0.0.0 \
    EFFPOSE_PORT=8000

# torch first, from its own index, so the project install does not pull the default (CUDA) wheel.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY . /app
RUN pip install /app \
    && if [ "${ORT_PACKAGE}" != "onnxruntime" ]; then \
         pip uninstall -y onnxruntime && pip install "${ORT_PACKAGE}"; \
       fi

RUN useradd --create-home --uid 1000 effpose && mkdir -p /data && chown effpose /data
USER effpose
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v1/health', timeout=4)"

# Inside the container the agent must listen on all interfaces for the port mapping to reach it;
# docker-compose.yml publishes it on the host's 127.0.0.1 only.
CMD ["effpose", "lut", "serve", "--log-level", "info"]
