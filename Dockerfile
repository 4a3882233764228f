# The GPU image: NVIDIA's PyTorch container (CUDA, NCCL, torch, Transformer Engine, apex), the
# Mamba kernels built for its CUDA, and this package with the pinned dependencies of setup.py.
# The packages the container ships are kept at their versions (see PIP_CONSTRAINT below).
#
#   docker build -t megatron-hybrid .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.06-py3 --build-arg MAX_JOBS=16 \
#       -t megatron-hybrid .
#
# BASE_IMAGE may be another NGC PyTorch release (setup.py's pins need Python 3.10 to 3.13).
# Running it on clusters: docs/launching.md.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.06-py3
FROM ${BASE_IMAGE}

ARG MAX_JOBS=8
# The Mamba kernels (megatron_hybrid/backends names the same versions). mamba-ssm 2.2.x cannot
# be imported under transformers 5; 2.3.2.post1 can and declares triton >= 3.5, so a container
# with an older triton gets 2.3.0, which declares no triton floor.
ARG CAUSAL_CONV1D_VERSION=1.5.3.post1
ARG MAMBA_SSM_VERSION=2.3.2.post1
ARG MAMBA_SSM_VERSION_BEFORE_TRITON_3_5=2.3.0
ARG USER_NAME=trainer
ARG USER_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Every later pip install keeps each package the container ships (torch, Transformer Engine,
# apex, flash-attn, triton, ...) at its version, except the ones setup.py's INSTALL_REQUIRES
# pins exactly (==), which those pins move. This replaces the container's own constraint file,
# which pins them all. Where a pin needs a newer dependency than the container's, pip reports
# the conflict: pin that dependency with == in INSTALL_REQUIRES. tools/docker_constraints.py
# says how it treats `name @ file://` lines.
COPY setup.py tools/docker_constraints.py /tmp/docker-constraints/
RUN pip list --format=freeze | python /tmp/docker-constraints/docker_constraints.py \
        /tmp/docker-constraints/setup.py > /etc/pip-container-constraint.txt
ENV PIP_CONSTRAINT=/etc/pip-container-constraint.txt

# The cuda backend's Mamba kernels, compiled against the container's torch and CUDA: the
# projects' prebuilt wheels target PyPI's torch builds, not NVIDIA's. --no-deps keeps every
# package the container ships at its version (2.3.2.post1 also requires triton >= 3.5 and,
# for its Mamba-3 kernels, tilelang and quack-kernels, which it imports only when present).
RUN MAMBA_SSM_VERSION="$(python -c "import triton; from packaging.version import Version; \
print('${MAMBA_SSM_VERSION}' if Version(triton.__version__) >= Version('3.5') \
else '${MAMBA_SSM_VERSION_BEFORE_TRITON_3_5}')")" && \
    echo "mamba-ssm ${MAMBA_SSM_VERSION} for the container's triton" && \
    MAX_JOBS="${MAX_JOBS}" CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    pip install --no-cache-dir --no-build-isolation --no-deps \
        "causal-conv1d==${CAUSAL_CONV1D_VERSION}" "mamba-ssm==${MAMBA_SSM_VERSION}"

WORKDIR /workspace/megatron-hybrid
RUN useradd --create-home --no-log-init --non-unique --uid "${USER_UID}" "${USER_NAME}"
COPY --chown=${USER_NAME}:${USER_NAME} . .
# setup.py's pins (megatron-core, nvidia-modelopt, transformers, ...); torch is not among them.
RUN pip install --no-cache-dir --editable .

USER ${USER_NAME}
