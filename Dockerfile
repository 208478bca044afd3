# nsfw-index, CPU image: the HTTP API (`nsfw-index serve`) on port 8000. See README.md, "Container".
#   docker build -t nsfw-index .                                   weights mounted at /models/nsfw_image_detector
#   docker build -t nsfw-index --build-arg BAKE_WEIGHTS=1 .        weights downloaded into the image at build time
# The store lives on the /data volume (/data/store), exports of the model graph in /data/cache.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: one virtual environment with CPU-only torch, then the project ------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# pip compiles the .pyc files here: the runtime's virtual environment is read-only to its user
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# g++ builds pdqhash, which PyPI has as a source distribution only; this stage is thrown away
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch from PyTorch's CPU index: the PyPI wheel would pull gigabytes of CUDA libraries this image never uses
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY indexer ./indexer
COPY search ./search
COPY api ./api
# the same pins again, so that no dependency's range can replace the CPU build (2.14.1+cpu satisfies ==2.14.1)
RUN pip install --no-cache-dir . "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && python -c "import torch; assert torch.version.cuda is None, 'a CUDA torch: ' + str(torch.version.cuda)" \
    && nsfw-index --help > /dev/null

# -- weights: downloaded with --build-arg BAKE_WEIGHTS=1, else an empty directory that a mount replaces ---------------
FROM builder AS weights
ARG BAKE_WEIGHTS=0
ARG MODEL=Freepik/nsfw_image_detector
RUN mkdir -p /models/nsfw_image_detector \
    && if [ "${BAKE_WEIGHTS}" = "1" ]; then \
        hf download "${MODEL}" config.json model.safetensors --local-dir /models/nsfw_image_detector \
        && rm -rf /models/nsfw_image_detector/.cache \
        && python -c "from indexer.model import resolve_checkpoint; resolve_checkpoint('/models/nsfw_image_detector')"; \
    fi

# -- runtime: the virtual environment and the weights on a slim base, as a user without privileges -------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 nsfw \
    && useradd --system --uid 10001 --gid nsfw --home-dir /home/nsfw --create-home --shell /usr/sbin/nologin nsfw \
    && mkdir -p /data/store /data/cache \
    && chown -R nsfw:nsfw /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=weights /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    NSFW_INDEX_MODEL=/models/nsfw_image_detector \
    NSFW_INDEX_STORE=/data/store \
    NSFW_INDEX_CACHE_DIR=/data/cache \
    NSFW_INDEX_DEVICE=cpu
VOLUME ["/data"]
USER 10001:10001
WORKDIR /home/nsfw
EXPOSE 8000
# liveness; orchestrators should also probe GET /readyz (503 until the model and the index are loaded)
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]
ENTRYPOINT ["nsfw-index", "serve", "--host", "0.0.0.0", "--port", "8000"]
# start on an empty store when the volume has none; arguments given to `docker run` replace this
CMD ["--create"]
