# syntax=docker/dockerfile:1
# The OnlineModel operator image: Python slim plus the `operator` extra only (kopf, kubernetes,
# pydantic, httpx). No torch, no vLLM: the operator never touches a model, and a small image starts
# fast and has few CVEs. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/onlinemodel/onlinemodel-operator:0.1.0 .
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the operator package needs: the runtime's sources stay out of this image; the protocol
# package (the runtime's HTTP models and limits, pydantic only) is shared by both images.
COPY pyproject.toml README.md ./
COPY protocol/ protocol/
COPY operator/ operator/
RUN python -m venv /opt/onlinemodel \
 && /opt/onlinemodel/bin/pip install ".[operator]"

FROM python:${PYTHON_VERSION}-slim
ENV PATH=/opt/onlinemodel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/onlinemodel /opt/onlinemodel
# Non-root, numeric so that the kubelet can check runAsNonRoot without resolving names.
USER 65532:65532
# kopf's liveness endpoint (the chart passes --liveness=http://0.0.0.0:8080/healthz).
EXPOSE 8080
ENTRYPOINT ["onlinemodel-operator"]
