"""Run configuration: typed dataclasses loaded from YAML with dotted ``key=value`` overrides.

One YAML file describes a whole experiment; every stage (``refine prepare-data``, ``refine train-ntp``, ...) reads
the sections it needs from the same :class:`RunConfig`. The dataclasses are the single source of truth: unknown
keys, wrong types and invalid values fail at load time with a message that names the key and the fix.

* :mod:`~refine_core.config.sections`: model, data, the training loops (NTP, REFINE), post-training, evaluation,
  TTT, RULER-QA and tracking;
* :mod:`~refine_core.config.resources`: pod resources and the TrainJob section (the Kubernetes side);
* :mod:`~refine_core.config.run`: :class:`RunConfig`, which holds them all;
* :mod:`~refine_core.config.loading`: YAML and overrides in, plain dicts and YAML out.

Example::

    cfg = load_config("configs/tiny-deltanet.yaml", ["ntp.steps=20", "model.config.hidden_size=128"])
"""

from refine_core.config.errors import ConfigError
from refine_core.config.loading import dump_yaml, flatten, from_dict, load_config, parse_overrides, to_dict
from refine_core.config.resources import (
    LauncherResources,
    NodeResources,
    PodResources,
    TrainJobConfig,
    check_location,
    parse_quantity,
)
from refine_core.config.run import RunConfig
from refine_core.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    NTPConfig,
    PostTrainConfig,
    RefineConfig,
    RulerQAConfig,
    SourceConfig,
    TrackingConfig,
    TrainingLoopConfig,
    TTTConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LauncherResources",
    "ModelConfig",
    "NTPConfig",
    "NodeResources",
    "PodResources",
    "PostTrainConfig",
    "RefineConfig",
    "RulerQAConfig",
    "RunConfig",
    "SourceConfig",
    "TTTConfig",
    "TrackingConfig",
    "TrainJobConfig",
    "TrainingLoopConfig",
    "check_location",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_config",
    "parse_overrides",
    "parse_quantity",
    "to_dict",
]
