"""The container images every component runs on: the one place that names them.

``REFINE_GPU_IMAGE`` (CUDA PyTorch, fla, triton, ``refine_core`` installed as a package; ``images/gpu``) runs the
training and evaluation stages; ``REFINE_CPU_IMAGE`` (slim, CPU torch; ``images/cpu``) runs data preparation,
reports, registration and the MLflow bookkeeping tasks. Both are read when a component module is imported, i.e.
at compile time, so a release pipeline can point them elsewhere without editing code::

    REFINE_IMAGE_TAG=0.2.0 refine pipeline compile --output build/pipelines
    REFINE_IMAGE_REGISTRY=registry.example.com/ml refine pipeline compile
    REFINE_GPU_IMAGE=registry.example.com/ml/refine-gpu@sha256:... refine pipeline submit --host ...

The default tag is the installed ``refine-core`` version, so an image and the code compiled against it match.
"""

import os
from importlib import metadata

# The same names manifests/base/kustomization.yaml pins under `images:`.
DEFAULT_REGISTRY = "ghcr.io/refine-core"


def _default_tag() -> str:
    try:
        return metadata.version("refine-core")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "latest"


REFINE_IMAGE_REGISTRY: str = os.environ.get("REFINE_IMAGE_REGISTRY", DEFAULT_REGISTRY).rstrip("/")
REFINE_IMAGE_TAG: str = os.environ.get("REFINE_IMAGE_TAG") or _default_tag()
REFINE_CPU_IMAGE: str = os.environ.get("REFINE_CPU_IMAGE") or f"{REFINE_IMAGE_REGISTRY}/refine-cpu:{REFINE_IMAGE_TAG}"
REFINE_GPU_IMAGE: str = os.environ.get("REFINE_GPU_IMAGE") or f"{REFINE_IMAGE_REGISTRY}/refine-gpu:{REFINE_IMAGE_TAG}"
