# LMForge: one image for the API, the workers, the inference server and the migrate step
# (`lmforge api|worker|serve|db upgrade`).
#
#   docker build -t lmforge:cpu .                                   # CPU PyTorch (default)
#   docker build -t lmforge:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA PyTorch
#
# The torch pin matches pyproject.toml; the index decides which build of it is installed
# (PyTorch publishes one index per CUDA version: pick one your driver supports).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LMFORGE_HOME=/data

# An unprivileged user owns the data directory (mount a volume there) and runs everything.
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home lmforge

WORKDIR /opt/lmforge

# torch first, in its own layer: it is by far the largest and changes least often.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY store ./store
COPY app ./app
COPY worker ./worker
COPY lmforge ./lmforge
COPY migrations ./migrations
# The project itself (its dependencies are constrained in pyproject.toml; torch is already
# satisfied by the pinned build above), with the PostgreSQL driver and the S3 storage backend
# (boto3: LMFORGE_STORAGE_URL=s3://BUCKET/PREFIX).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[postgres,s3]"

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000

# The API's health check lives in docker-compose.yml (and docs/k8s/): the same image also runs
# the workers. /data holds only a process's local files (the token cache) once
# LMFORGE_STORAGE_URL points at an object store.

ENTRYPOINT ["lmforge"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
