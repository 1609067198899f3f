"""refine_core: REFINE for fast-weight language models.

Layers, from the bottom up (imports only point downwards):

- ``refine_core.models``: DeltaNet / GatedDeltaNet in PyTorch with fla-compatible weights; fla kernels on CUDA.
- ``refine_core.data``: corpora, tokenized shards, task files, batching.
- ``refine_core.training``: losses, optimiser and schedule, atomic checkpoints.
- ``refine_core.stages``: one module per pipeline stage, each with the entry function that the CLI, the KFP
  components and the tests call (``prepare_data``, ``train_ntp``, ...).
- ``refine_core.config``, ``refine_core.runtime``, ``refine_core.tracking``: shared leaves.
"""

__version__ = "0.1.0"
