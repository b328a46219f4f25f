# syntax=docker/dockerfile:1
# ddpm-serve. Two images from one file:
#   GPU (default): docker build -t ddpm-serve .
#   CPU only:      docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t ddpm-serve:cpu .
# Base: python:3.11-slim-bookworm. The GPU image needs no CUDA base image: PyPI's torch==2.13.0 wheel
# (the version constraints.txt pins) carries the CUDA runtime in its nvidia-* wheels, so the host only
# needs the NVIDIA driver and the container toolkit. TORCH_INDEX swaps in the CPU wheel (~5x smaller) and
# leaves out triton (the CPU path is the PyTorch twin of the fused step). Serving dependencies only: the
# training/evaluation extra (mlxtend, scipy, matplotlib) is not installed; diffusers is, so the image can
# serve a mounted diffusers DDPM directory.
ARG BASE=python:3.11-slim-bookworm

# --- deps: the dependencies alone, from pyproject.toml and constraints.txt, before any code -----------
# A change to the code reuses this layer (and its ~1 GB copy in the runtime stage): a rebuild then
# installs the project's wheel and compiles its graphs, not torch (tests/test_container.py, the suite's
# image: 135 s from a code change, 292 s before; BENCHMARKS.md "Image rebuilds").
FROM ${BASE} AS deps
ARG TORCH_INDEX=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt ./
RUN python -m venv /opt/venv \
 && if [ -n "$TORCH_INDEX" ]; then /opt/venv/bin/pip install -c constraints.txt --index-url "$TORCH_INDEX" torch==2.13.0; fi \
 && if [ -n "$TORCH_INDEX" ]; then extras=diffusers,otel; else extras=gpu,diffusers,otel; fi \
 && python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(*p["dependencies"], *(d for e in sys.argv[1].split(",") for d in p["optional-dependencies"][e]), sep="\n")' "$extras" > requirements.txt \
 && /opt/venv/bin/pip install -c constraints.txt -r requirements.txt \
 && rm -rf /opt/venv/lib/python3*/site-packages/torch/test /opt/venv/lib/python3*/site-packages/torch/bin/test_*
# (torch's wheel carries ~120 MB of libtorch's own C++ unit-test binaries in torch/test and torch/bin
# that nothing here runs)

# --- build: the project's own wheel (no dependencies: they are above) --------------------------------
FROM deps AS build
# the wheel's metadata without pyproject's `readme` (the long description nobody reads in the image): with README.md
# copied here, a README edit rebuilt the wheel, its install and the compiled graphs (~240 s of the suite's image)
RUN sed -i '/^readme = /d' pyproject.toml
COPY commands ./commands
COPY ddpm ./ddpm
COPY kernels ./kernels
COPY service ./service
RUN /opt/venv/bin/pip wheel --no-deps -w /dist .

# --- runtime: the environment, the shipped model, a non-root user ---------------------------------
FROM ${BASE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DDPM_MODEL=/app/models/mnist-28 \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor
# g++: torch.compile's CPU backend builds the compiled U-Net with it (DDPM_COMPILE=auto, the default;
# without a compiler the server falls back to eager mode, ~1.1-1.4x slower on CPU).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY models ./models
COPY --from=build /dist /tmp/dist
# the project over its dependencies, then pip goes (nothing pip-installs at run time; setuptools stays:
# inductor's CPU backend imports it to build the compiled U-Net, and without it DDPM_COMPILE=auto
# silently served eagerly in every image before)
RUN pip install --no-deps --no-cache-dir --disable-pip-version-check /tmp/dist/*.whl \
 && pip uninstall --yes --quiet pip \
 && rm -rf /tmp/dist
# The shipped model's compiled graphs, built here at image build time for the build machine's CPU and
# this image's torch (CPU image only: a GPU image is built without its GPU), and on an AVX-512 build
# machine a second set for AVX2-only CPUs (the AVX2 kernels, capped by ATEN_CPU_CAPABILITY; fp32, what
# precision auto picks there). A container on a CPU of either kind loads its set and reaches the compiled
# speed in seconds instead of minutes; on another CPU it finds no file for its own key and compiles from
# scratch (ddpm/compile_cache.py). The server is ready on the eager path either way. Mount a writable
# volume here to keep a mounted model's graphs. (/tmp is emptied after: inductor's precompiled headers
# alone are ~150 MB.) COMPILE_MAX_BATCH: the batch sizes the graphs cover (1..64, the server's default
# DDPM_MAX_BATCH); COMPILE_AVX2_SET=0 leaves out the AVX2 set. The suite's image build sets 1 and 0
# (tests/test_container.py: the same commands, a fraction of the compile). A build cache mount keeps the last
# build's copies (`--reuse`): a rebuild after a change to the code loads the graphs that change left as they were
# instead of compiling them (inductor's own keys are of the graphs; the image still holds only what this build's
# compile used). Not part of the image; `docker builder prune` empties it.
ARG TORCH_INDEX=""
ARG COMPILE_MAX_BATCH=64
ARG COMPILE_AVX2_SET=1
ENV DDPM_COMPILE_CACHE_DIR=/app/compile-cache
RUN --mount=type=cache,id=ddpm-compile-cache,target=/var/cache/ddpm-compile \
    mkdir -p /app/compile-cache \
 && if [ -n "$TORCH_INDEX" ]; then \
      DDPM_MAX_BATCH=$COMPILE_MAX_BATCH ddpm compile-cache -o /app/compile-cache --reuse /var/cache/ddpm-compile \
        || echo "warning: no compiled graphs in the image (the server compiles at start)"; \
      if [ "$COMPILE_AVX2_SET" = 1 ] && grep -qw avx512f /proc/cpuinfo; then \
        DDPM_MAX_BATCH=$COMPILE_MAX_BATCH ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
          ddpm compile-cache -o /app/compile-cache --reuse /var/cache/ddpm-compile \
          || echo "warning: no AVX2 graphs in the image (an AVX2-only host compiles at start)"; \
      fi; \
      rm -rf /tmp/* /tmp/.[!.]*; \
    fi
RUN groupadd --system --gid 10001 ddpm \
 && useradd --system --uid 10001 --gid ddpm --home-dir /app --shell /usr/sbin/nologin ddpm
# Runs as non-root with a read-only root filesystem (compose/k8s mount /tmp as tmpfs).
USER 10001:10001
EXPOSE 8000
# /healthz on the loopback, past any proxy (a Docker client's configured proxies reach every container as HTTP_PROXY, and
# one elsewhere cannot reach this container's 127.0.0.1), in https where DDPM_TLS_CERT_FILE is set: service/health_probe.py
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-m", "service.health_probe"]
STOPSIGNAL SIGTERM
# "::": IPv6 and IPv4 on one socket (an IPv6-only cluster's probes reach it; service/listening_socket.py)
CMD ["ddpm", "serve", "--host", "::", "--port", "8000"]
