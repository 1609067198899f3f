"""A pod's ``ResourceRequirements`` as the TrainJob launcher checks and reads them: CPU and memory quantities, GPUs.

Kept apart from :mod:`refine_core.distributed.trainjob` so that checking resources needs no Kubernetes client.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")


def quantity_text(value: Any) -> str:
    """A resource quantity as the string Kubernetes prints (``8.0`` → ``"8"``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def gpus_per_node(resources: Mapping[str, Any] | None) -> int:
    """GPUs per node from ``limits`` (else ``requests``) of a ResourceRequirements dict."""
    for section in ("limits", "requests"):
        for key in GPU_RESOURCES:
            value = ((resources or {}).get(section) or {}).get(key)
            if value is not None:
                return int(float(str(value)))
    return 0


def check_resources(resources: Mapping[str, Any] | None, where: str = "resources") -> None:
    """Refuse a ``ResourceRequirements`` dict the API server would reject, naming the field.

    Sections are ``requests`` / ``limits``; CPU and memory are Kubernetes quantities (``"8"``, ``"500m"``,
    ``"64Gi"``), GPUs whole numbers; a limit is at least its request, and GPUs, which cannot be overcommitted, have
    equal request and limit when both are given.

    Raises:
        ValueError: the first problem found.
    """
    from refine_core.config import ConfigError, parse_quantity

    if not resources:
        return
    unknown = sorted(set(resources) - {"requests", "limits", "claims"})
    if unknown:
        raise ValueError(f"{where} has unknown section(s) {', '.join(unknown)}; use requests and limits.")
    values: dict[str, dict[str, float]] = {}
    for section in ("requests", "limits"):
        for key, value in (resources.get(section) or {}).items():
            field_name = f"{where}.{section}.{key}"
            if key in GPU_RESOURCES:
                number = float(str(value)) if re.fullmatch(r"\d+(\.0+)?", str(value)) else -1.0
                if number < 0:
                    raise ValueError(f"{field_name}={value!r} must be a whole number of GPUs.")
            else:
                try:
                    number = parse_quantity(quantity_text(value), field_name)
                except ConfigError as exc:
                    raise ValueError(str(exc)) from exc
                if number <= 0:
                    raise ValueError(f"{field_name}={value!r} must be > 0.")
            values.setdefault(section, {})[key] = number
    for key, request in values.get("requests", {}).items():
        limit = values.get("limits", {}).get(key)
        if limit is not None and limit < request:
            raise ValueError(f"{where}.limits.{key} is below {where}.requests.{key}; a limit must be at least the "
                             "request.")
        if key in GPU_RESOURCES and limit is not None and limit != request:
            raise ValueError(f"{where}: GPUs ({key}) cannot be overcommitted; give equal requests and limits.")
