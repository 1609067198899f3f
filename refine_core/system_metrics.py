"""``tracking.system_metrics``: MLflow's system-metrics monitor on a stage run.

MLflow samples CPU, memory, disk and network (psutil) and, with nvidia-ml-py, every GPU's utilisation and memory in a
thread, and logs them as ``system/...`` metrics of the run (``system/<node>/...`` on a multi-node job). psutil and
nvidia-ml-py are the ``system-metrics`` extra; a missing psutil is a configuration error, checked before the run opens.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def check_system_metrics(interval_s: float) -> float:
    """``interval_s`` when MLflow's system-metrics monitor can run here; a missing package is a config error (one
    line naming the fix), checked before the run opens so that it is never mistaken for a server outage."""
    if importlib.util.find_spec("psutil") is None:
        raise ValueError(
            "tracking.system_metrics=true needs psutil (and nvidia-ml-py for the GPU figures): "
            "pip install 'refine-core[system-metrics]', or set tracking.system_metrics=false."
        )
    if importlib.util.find_spec("pynvml") is None:
        logger.info("tracking.system_metrics: no nvidia-ml-py here, so no GPU figures (CPU, memory, disk, network)")
    return interval_s


def start_monitor(run_id: str, interval_s: float, tracking_uri: str) -> Any:
    """A started ``SystemMetricsMonitor`` for ``run_id``; call its ``finish()`` before the run ends."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # a node of a multi-node job keeps its own series (system/<node>/...)
    node = os.environ.get("GROUP_RANK") or os.environ.get("NODE_RANK")
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, tracking_uri=tracking_uri, node_id=f"node{node}" if node else None
    )
    monitor.start()
    return monitor
