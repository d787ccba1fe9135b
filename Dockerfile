# The isa image for Ray clusters (KubeRay pods, or `docker.image` of a VM cluster): Ray 2.60 with CUDA
# and Python 3.11, the project and its runtime dependencies, running as the non-root user `ray` (uid 1000).
#
#   infra/image.sh build REGISTRY   # REGISTRY/isa:VERSION-COMMIT: build, push, pin the manifests to its digest
#
# The stage configs (infra/configs/) are copied in: job entrypoints name them relative to WORKDIR.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# rayproject/ray images run as `ray` (uid 1000, group users = 100) with Python in /home/ray/anaconda3. The user
# is given by number: a pod with runAsNonRoot can only be admitted when the kubelet can tell it is not root
USER 1000:100
WORKDIR /home/ray/isa
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Every package at the version the test suite passed with (infra/constraints.py); torch first, as in README.md
# (PyPI's Linux wheels bundle CUDA)
COPY --chown=1000:100 infra/constraints.txt ./infra/constraints.txt
RUN pip install -c infra/constraints.txt torch==2.14.1 torchvision==0.29.1

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 isa ./isa
COPY --chown=1000:100 pipelines ./pipelines
COPY --chown=1000:100 tune ./tune
# the mlflow-server extra: the same image runs the authenticated MLflow server of infra/kuberay/mlflow.yaml
RUN pip install -c infra/constraints.txt '.[mlflow-server]' && isa --help

COPY --chown=1000:100 infra ./infra

# Optional: bake the weights the stages download on first use into the image (about 2 GB):
#   docker build --build-arg PREFETCH_WEIGHTS=1 -t REGISTRY/isa:TAG .
ARG PREFETCH_WEIGHTS=0
RUN if [ "$PREFETCH_WEIGHTS" = "1" ]; then \
      python -c "import open_clip, timm; open_clip.create_model_and_transforms('ViT-L-14', pretrained='openai'); timm.create_model('efficientnet_b0', pretrained=True)"; \
    fi
