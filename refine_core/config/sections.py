"""The sections of a run's configuration: model, data, the training loops, post-training, evaluation, TTT, RULER-QA
and tracking (each a dataclass that checks its own values)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from refine_core.config.errors import ConfigError


@dataclass
class ModelConfig:
    """Which model to train and how to build it."""

    # Where pretrained weights come from: a hub name (``fla-hub/delta_net-1.3B-100B``), a local HF directory, or an
    # ``s3://bucket/prefix`` URI. ``None`` builds a fresh model from ``arch`` + ``config``.
    source: str | None = None
    # Model family for from-scratch runs: ``delta_net`` or ``gated_deltanet`` (fla's ``model_type`` names), or
    # ``lact`` (upstream LaCT's ``lact_swiglu``).
    arch: str = "delta_net"
    # Architecture fields with fla's / upstream LaCT's names (hidden_size, num_hidden_layers, num_heads or
    # num_attn_heads / num_lact_heads, vocab_size, ...). With a ``source`` these override the checkpoint's
    # config.json (only harmless fields; shapes must still match).
    config: dict[str, Any] = field(default_factory=dict)
    # Tokenizer: ``byte`` (built in, no network), a hub name, a local HF tokenizer directory or an s3:// URI.
    # ``None`` uses the tokenizer stored with ``source``.
    tokenizer: str | None = "byte"
    # Where hub and s3 downloads are cached.
    cache_dir: str = "~/.cache/refine"
    # Activation checkpointing: keep only each block's input in the forward pass and recompute the block in the
    # backward pass (about one more forward of compute). Needed to fit 1.3B parameters on 16K-token documents on one
    # GPU (configs/delta_net-1.3b-16k.yaml); it never changes the loss or the gradients.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.arch = {"lact": "lact_swiglu"}.get(self.arch, self.arch)
        if self.source is None and self.arch not in ("delta_net", "gated_deltanet", "lact_swiglu"):
            raise ConfigError(
                f"model.arch={self.arch!r} is not a known architecture; use 'delta_net', 'gated_deltanet' or "
                "'lact', or set model.source to a checkpoint."
            )


@dataclass
class SourceConfig:
    """One corpus to read long documents from."""

    # A local file or directory (parquet / jsonl / json / txt), a glob, a hub dataset name (``hf://org/name``),
    # ``synthetic`` for a seeded generated corpus that needs no files (used by the tiny configs and tests),
    # ``synthetic_recall`` for seeded documents that state facts and recall them much later, or ``passages`` for the
    # passages of LongBench / RULER task files with evaluation passages held out (refine_core.data.passages).
    path: str = "synthetic"
    # Column holding the document text.
    text_column: str = "text"
    # Hub datasets only: subset and split.
    subset: str | None = None
    split: str = "train"
    # Read at most this many documents from this source (``None`` = all).
    max_docs: int | None = None
    # ``synthetic`` only: number of documents and their length in words.
    synthetic_docs: int = 64
    synthetic_words: int = 400
    # ``synthetic`` only: selects the generated documents (the vocabulary is the same for every seed).
    synthetic_seed: int = 0
    # ``passages`` only: the LongBench / RULER QA parquet files (paths, directories or globs) whose prompts' passages
    # make the documents; the evaluation files whose every passage and sentence is held out; characters per packed
    # document (about data.max_tokens x the tokenizer's characters per token).
    passage_files: list[str] = field(default_factory=list)
    heldout_files: list[str] = field(default_factory=list)
    passage_doc_chars: int = 16000


@dataclass
class DataConfig:
    """Data preparation: read, tokenize, length-filter, truncate, shard."""

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    # Keep documents with at least this many tokens (the paper keeps documents >= 16384 tokens; spec §3).
    min_tokens: int = 16384
    # Truncate to the first ``max_tokens`` tokens (spec §1: the official code keeps the beginning).
    max_tokens: int = 16384
    # Documents held out for the validation loss.
    eval_docs: int = 8
    # Seeds the choice of held-out documents (separate from the run seed, so seed sweeps share one split).
    split_seed: int = 0
    # Documents per shard file.
    shard_docs: int = 1024
    # Where the prepared shards and manifest go (``{output_dir}/data`` when ``None``).
    prepared_dir: str | None = None
    # Train a byte-level BPE tokenizer with this many tokens (its two specials included) on the sources' documents
    # and tokenize with it instead of model.tokenizer; it is saved with the data like any tokenizer
    # ({prepared_dir}/tokenizer). ``None``: use model.tokenizer. Only for a model trained from scratch.
    tokenizer_vocab_size: int | None = None
    # Characters of text the tokenizer is trained on: an equal share from each source, its first documents.
    tokenizer_train_chars: int = 20_000_000

    def __post_init__(self) -> None:
        if self.min_tokens < 2:
            raise ConfigError(f"data.min_tokens={self.min_tokens} must be >= 2 (a document needs a next token).")
        if self.max_tokens < self.min_tokens:
            raise ConfigError(
                f"data.max_tokens={self.max_tokens} is smaller than data.min_tokens={self.min_tokens}; "
                "set max_tokens >= min_tokens."
            )
        if self.eval_docs < 0:
            raise ConfigError(f"data.eval_docs={self.eval_docs} must be >= 0.")
        if self.tokenizer_vocab_size is not None and self.tokenizer_vocab_size < 258:
            raise ConfigError(
                f"data.tokenizer_vocab_size={self.tokenizer_vocab_size} is too small: a byte-level BPE needs the 256 "
                "byte symbols and 2 special tokens (use e.g. 8192), or null to use model.tokenizer."
            )
        if self.tokenizer_train_chars < 1:
            raise ConfigError(f"data.tokenizer_train_chars={self.tokenizer_train_chars} must be >= 1.")


def _check_resume(section: str, value: bool | str) -> None:
    if not isinstance(value, bool) and value != "force":
        raise ConfigError(f"{section}.resume={value!r}; use true, false or force (resume another run's checkpoint).")


@dataclass
class TrainingLoopConfig:
    """What every training loop shares: AdamW and its schedule (spec §3 defaults), logging, held-out loss,
    checkpoints and resuming. ``ntp`` and ``refine`` extend it; ``section`` names them in error messages."""

    section: ClassVar[str] = "train"

    steps: int = 100
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    # ``constant`` (the paper, spec §3), ``cosine`` or ``linear`` decay after ``warmup_steps`` of linear warm-up.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 1
    # Held-out loss every ``eval_every`` steps (0 = only at the end) on up to ``eval_max_docs`` documents.
    eval_every: int = 10
    eval_max_docs: int = 32
    # Atomic checkpoint every ``save_every`` steps (0 = only at the end); keep the newest ``keep_checkpoints``.
    save_every: int = 50
    keep_checkpoints: int = 2
    # Continue from the newest complete checkpoint of this stage if one exists; ``force``: even one written by another
    # run (other settings or data: refine_core.training.run_identity), which is refused otherwise.
    resume: bool | str = False
    # Stop after this many steps of this process (simulates an interruption in tests; ``None`` = run to the end).
    stop_after: int | None = None
    # Fail the run after this many steps in a row whose every optimizer step had a non-finite gradient (each such
    # step is skipped, not applied); 0 = never fail (refine_core.training.divergence).
    max_skipped_steps: int = 3

    def __post_init__(self) -> None:
        name = self.section
        _check_resume(name, self.resume)
        if self.max_skipped_steps < 0:
            raise ConfigError(f"{name}.max_skipped_steps={self.max_skipped_steps} must be >= 0 (0 = never stop).")
        if self.steps < 1:
            raise ConfigError(f"{name}.steps={self.steps} must be >= 1.")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(f"{name}.lr_schedule={self.lr_schedule!r}; use 'constant', 'cosine' or 'linear'.")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ConfigError(f"{name}.lr and {name}.grad_clip must be > 0.")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"{name}.warmup_steps={self.warmup_steps} must be in [0, {name}.steps={self.steps}]; shorten the "
                "warm-up."
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{name}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")


@dataclass
class NTPConfig(TrainingLoopConfig):
    """The next-token-prediction trainer (the baseline, and the NTP half of every later stage)."""

    section: ClassVar[str] = "ntp"

    # Documents per optimizer step; split into micro-batches of ``micro_batch_size`` (gradient accumulation).
    batch_size: int = 8
    micro_batch_size: int = 2
    # Mask pad tokens out of the NTP loss. ``False`` reproduces the official DeltaNet bug (spec §10.4).
    mask_pad_in_loss: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ntp.{name}={getattr(self, name)} must be >= 1.")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"ntp.batch_size={self.batch_size} is not a multiple of ntp.micro_batch_size="
                f"{self.micro_batch_size}; pick a micro-batch size that divides the batch."
            )


@dataclass
class RefineConfig(TrainingLoopConfig):
    """The REFINE inner step and the mid-training loop around it. Defaults are the paper's mid-training run
    (spec §3); the official flag each field replaces is named in its comment. The optimiser fields (spec §3: AdamW
    lr 1e-6, betas (0.9, 0.999), wd 0.01, constant, clip 1.0) come from :class:`TrainingLoopConfig`; the scheduler
    steps once per REFINE step, not per optimizer step."""

    section: ClassVar[str] = "refine"

    # Documents per step (data.train_batch_size) and per optimizer step (ttt_ppo_mini_batch_size): 128 / 32 gives
    # 4 optimizer steps per step (spec §2 step 6.1). Micro-batches only bound memory; they never change the loss.
    batch_size: int = 128
    mini_batch_size: int = 32
    micro_batch_size: int = 2
    # Positions: M chunks (ttt_n_chunks), one position each, chosen by ttt_sampling over the NTP entropy smoothed
    # by a centred window (spec §2 step 1); at least ``margin`` real tokens before and after every cut.
    num_chunks: int = 8
    selection: str = "entropy"
    entropy_window: int = 5
    margin: int = 20
    # Rollouts: G per position (ttt_n) of k tokens (ttt_response_length) at temperature ttt_temperature.
    rollouts_per_position: int = 1
    rollout_tokens: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # EOS cannot end a rollout early (min_new_tokens = k in the official code).
    block_eos: bool = True
    # GRPO groups: ``document`` (the M·G rollouts of one document; the paper, G = 1) or ``position`` (the G
    # rollouts of one prefix). Rewards: ``cosine``, ``exact_match`` or ``hybrid`` (spec §2 step 4).
    grouping: str = "document"
    reward: str = "cosine"
    # Selection: zero the entropies of pad positions before the centred smoothing, so a left-padded document gets the
    # same probabilities as unpadded (our fix, spec §10.8); ``false`` smooths over the pads' entropies as the
    # official code does.
    zero_pad_entropy: bool = True
    # GRPO advantages (spec §2 step 5): divide by the group std (norm_adv_by_std_in_grpo; ``false`` only centres, Dr.
    # GRPO); a group of one rollout gets advantage 0 (``zero``) or, as verl does, mean 0 and std 1 (``official``).
    norm_adv_by_std_in_grpo: bool = True
    singleton_advantage: str = "zero"
    # PPO-clip (spec §2 step 6.3): clip ε (clip_ratio), dual clip c (clip_ratio_c; null disables), clamp of the
    # log-ratio; asymmetric bounds clip_ratio_low / clip_ratio_high (null: clip_eps).
    clip_eps: float = 0.2
    dual_clip: float | None = 3.0
    log_ratio_clamp: float = 20.0
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    # Loss aggregation over rollout tokens (loss_agg_mode): token-mean (the paper), seq-mean-token-sum,
    # seq-mean-token-mean or seq-mean-token-sum-norm. ``loss_scale``: ``mini_batch`` normalises by the counts of the
    # whole mini-batch, so the memory micro-batch never changes the loss; ``micro_batch`` is the official
    # gradient accumulation: each micro-batch's mean (micro_batch_size documents for NTP, ppo_micro_batch_size
    # rollouts for PPO) divided by the number of micro-batches (spec §2 step 6.2-6.3).
    loss_agg_mode: str = "token-mean"
    loss_scale: str = "mini_batch"
    ppo_micro_batch_size: int = 2
    # 𝓛 = ntp_loss_coef · NTP + nsp_loss_coef · PPO (ttt_sft_loss_coef / ttt_ppo_loss_coef) + kl_coef · KL.
    ntp_loss_coef: float = 1.0
    nsp_loss_coef: float = 0.2
    # KL to the frozen starting model: not in the paper (0 = off, no reference model is kept).
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    # ``false`` trains the NTP-only baseline with the same data (the paper's "SFT MidTr" arm).
    nsp_update: bool = True
    # NTP-only baseline schedule: ``matched`` takes one optimizer step per mini-batch like REFINE; ``official``
    # takes one per batch, i.e. 4x fewer, as the official baseline did (spec §10.7).
    baseline_schedule: str = "matched"
    # ``branch``: rollouts continue from the recurrent state of one pass over each document; ``faithful``: every
    # rollout re-encodes its own prefix, as the official code does (same result; see refine_core/algorithm).
    engine: str = "branch"
    # ``branch`` only: the first mini-batch of each step samples its rollouts inside its own policy pass (its weights
    # are still the pre-update ones, so this is exact) instead of in a separate no-grad pass over those documents.
    fused_sampling: bool = True
    # ``faithful`` only: left-pad every rollout prefix to the full document length, as the official code does.
    pad_prefix_to_full_length: bool = False
    mask_pad_in_loss: bool = True
    save_every: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "batch_size",
            "mini_batch_size",
            "micro_batch_size",
            "num_chunks",
            "rollouts_per_position",
            "rollout_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"refine.{name}={getattr(self, name)} must be >= 1.")
        if self.batch_size % self.mini_batch_size or self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"refine.batch_size={self.batch_size}, mini_batch_size={self.mini_batch_size} and "
                f"micro_batch_size={self.micro_batch_size} must each divide the one before."
            )
        choices = {
            "selection": ("entropy", "argmax", "argmin", "uniform"),
            "grouping": ("document", "position"),
            "reward": ("cosine", "exact_match", "hybrid"),
            "kl_kind": ("k1", "k2", "k3"),
            "baseline_schedule": ("matched", "official"),
            "engine": ("branch", "faithful"),
            "singleton_advantage": ("zero", "official"),
            "loss_agg_mode": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
            "loss_scale": ("mini_batch", "micro_batch"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"refine.{name}={getattr(self, name)!r}; use one of {', '.join(allowed)}.")
        if self.margin < self.rollout_tokens:
            raise ConfigError(
                f"refine.margin={self.margin} must be >= refine.rollout_tokens={self.rollout_tokens}: the true "
                "continuation of every rollout has to exist."
            )
        if self.temperature <= 0:
            raise ConfigError("refine.temperature must be > 0 (rollouts are sampled).")
        for name in ("clip_eps", "clip_ratio_low", "clip_ratio_high"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ConfigError(
                    f"refine.{name}={value} must be in (0, 1): the ratio is clipped to [1 - low, 1 + high] "
                    "(null takes clip_eps)."
                )
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ConfigError(f"refine.dual_clip={self.dual_clip} must be > 1 (clip_ratio_c), or null to disable it.")
        if self.ppo_micro_batch_size < 1:
            raise ConfigError(f"refine.ppo_micro_batch_size={self.ppo_micro_batch_size} must be >= 1.")
        rollouts_per_micro = self.micro_batch_size * self.num_chunks * self.rollouts_per_position
        if self.loss_scale == "micro_batch" and rollouts_per_micro % self.ppo_micro_batch_size:
            raise ConfigError(
                f"refine.loss_scale=micro_batch splits each memory micro-batch's {rollouts_per_micro} rollouts "
                f"(micro_batch_size · num_chunks · rollouts_per_position) into official micro-batches of "
                f"ppo_micro_batch_size={self.ppo_micro_batch_size}; make it a divisor of {rollouts_per_micro}."
            )
        if min(self.ntp_loss_coef, self.nsp_loss_coef, self.kl_coef) < 0:
            raise ConfigError("refine loss coefficients must be >= 0.")


@dataclass
class PostTrainConfig:
    """Post-training on a long-context task (spec §3-4): task SFT, Nested SFT or Nested REFINE.

    The inner step's settings (reward, mini-batch, coefficients, engine) and the one AdamW shared by the inner and
    outer updates come from the ``refine`` section; the paper's post-training values are reward ``hybrid``,
    ``batch_size`` 64 with ``mini_batch_size`` 16 (4 inner optimizer steps) and lr 1e-6.
    """

    # Task files with ``prompt`` and ``answer`` columns (RULER QA layout): parquet files, directories or globs.
    train_files: list[str] = field(default_factory=list)
    # ``sft``: answers only; ``nested_sft``: an NTP step on the prompts, then SFT; ``nested_refine``: the REFINE
    # inner step on the prompts, then SFT (spec §4).
    mode: str = "nested_refine"
    steps: int = 24
    batch_size: int = 64
    micro_batch_size: int = 2
    # Prompts keep their first ``max_prompt_tokens`` tokens (spec §1); answers at most ``max_answer_tokens``.
    max_prompt_tokens: int = 4064
    max_answer_tokens: int = 32
    # Append EOS to the SFT target so the model learns to stop; the official code omits it (spec §10.15).
    append_eos: bool = True
    sft_loss_coef: float = 1.0
    max_examples: int | None = None
    log_every: int = 1
    save_every: int = 8
    keep_checkpoints: int = 2
    eval_max_docs: int = 0
    resume: bool | str = False  # as ntp.resume (true, false or force)
    stop_after: int | None = None
    # As ``ntp.max_skipped_steps``: fail after this many fully skipped (non-finite gradient) steps in a row.
    max_skipped_steps: int = 3

    def __post_init__(self) -> None:
        _check_resume("post", self.resume)
        if self.max_skipped_steps < 0:
            raise ConfigError(f"post.max_skipped_steps={self.max_skipped_steps} must be >= 0 (0 = never stop).")
        if self.mode not in ("sft", "nested_sft", "nested_refine"):
            raise ConfigError(f"post.mode={self.mode!r}; use 'sft', 'nested_sft' or 'nested_refine'.")
        for name in ("steps", "batch_size", "micro_batch_size", "max_prompt_tokens", "max_answer_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"post.{name}={getattr(self, name)} must be >= 1.")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"post.micro_batch_size={self.micro_batch_size} must divide post.batch_size.")


@dataclass
class EvalConfig:
    """Evaluation: RULER QA and LongBench task files, and generated RULER NIAH tasks (spec §5)."""

    # Task files (parquet, RULER QA or LongBench layout), directories or globs; one task per file.
    task_files: list[str] = field(default_factory=list)
    # Keep only these task names (``None``: every task found).
    tasks: list[str] | None = None
    # At most this many examples per task, in file order (``None``: all).
    max_examples: int | None = None
    # Greedy decoding batch; prompts are left-padded (spec §5).
    batch_size: int = 8
    # Prompts keep their first tokens up to this budget minus the task's generation length (spec §1, §10.14).
    max_seq_tokens: int = 16384
    # Generated RULER NIAH tasks (niah_single_1, niah_multikey_2, ...), their lengths, depths and count per cell.
    niah_tasks: list[str] = field(default_factory=list)
    niah_lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384])
    niah_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    niah_examples_per_cell: int = 1
    # A text file whose sentences make the "essay" NIAH haystack (RULER uses Paul Graham's essays); ``None``: the
    # built-in essay-like text (offline, not comparable with RULER's numbers). The report says which was used.
    niah_haystack_file: str | None = None
    # Answers stored joined by "|" are split back as the official code does (spec §10.15).
    official_answer_split: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size} must be >= 1.")
        if self.max_seq_tokens < 64:
            raise ConfigError(
                f"eval.max_seq_tokens={self.max_seq_tokens} leaves no room for a prompt and its answer; use the "
                "model's context length (e.g. 4096 or 16384)."
            )
        if self.tasks is not None and not self.tasks:
            raise ConfigError("eval.tasks=[] selects no task; name tasks or set it to null for all of them.")


@dataclass
class TTTConfig:
    """Test-time training (spec §4): adapt on each batch of test prompts, then answer them.

    The inner step's settings come from the ``refine`` section (the paper: reward ``exact_match``, nsp coefficient
    0.4, ``mini_batch_size`` 4 → 2 optimizer steps per batch of 8 on LongBench).
    """

    # ``refine``: the REFINE inner step; ``ntp``: NTP only (the "SFT" TTT baseline); ``none``: evaluate only.
    method: str = "refine"
    # ``cumulative``: weights and optimizer carry over between batches in file order (the official behaviour,
    # spec §10.1); ``reset``: both are restored before every batch, so results do not depend on order.
    mode: str = "cumulative"
    batch_size: int = 8
    # Drop the last incomplete batch of each task, as the official validation loader does (spec §10.13).
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("refine", "ntp", "none"):
            raise ConfigError(f"ttt.method={self.method!r}; use 'refine', 'ntp' or 'none'.")
        if self.mode not in ("cumulative", "reset"):
            raise ConfigError(f"ttt.mode={self.mode!r}; use 'cumulative' or 'reset'.")


@dataclass
class RulerQAConfig:
    """Building RULER QA train/test files from SQuAD or HotpotQA source files (spec §3, §5.1, §9.2)."""

    # SQuAD v2 dev JSON (``squad``), HotpotQA dev distractor JSON (``hotpotqa``), or RULER QA task files of one
    # dataset, a path, directory or glob (``ruler``: the questions and passages rebuilt from them,
    # refine_core.data.ruler_qa_source).
    source_path: str | None = None
    source_format: str = "squad"
    # Target sequence length (prompt + 32 answer tokens), rows per split, where the files go.
    max_seq_length: int = 4096
    num_train: int = 1600
    num_test: int = 200
    out_dir: str = "data/ruler"
    # RULER's seed (42), which also fixes its document order; the model part of the file names.
    seed: int = 42
    name: str | None = None
    # ``ruler``: RULER's shared shuffle per prompt size; ``random``: one shuffle per prompt (no position bias).
    doc_order: str = "ruler"
    # Also keep out of the train file every question sharing a gold document with a test question (SQuAD asks
    # several questions about one paragraph).
    disjoint_gold: bool = False

    def __post_init__(self) -> None:
        if self.source_format not in ("squad", "hotpotqa", "ruler"):
            raise ConfigError(f"ruler_qa.source_format={self.source_format!r}; use 'squad', 'hotpotqa' or 'ruler'.")
        if self.doc_order not in ("ruler", "random"):
            raise ConfigError(f"ruler_qa.doc_order={self.doc_order!r}; use 'ruler' or 'random'.")


@dataclass
class TrackingConfig:
    """Experiment tracking. ``mlflow`` with no URI uses an embedded store: ``sqlite:///mlruns/mlflow.db``."""

    backend: str = "mlflow"
    # ``None``: ``$MLFLOW_TRACKING_URI`` if set, else the embedded sqlite store under ``./mlruns``.
    tracking_uri: str | None = None
    experiment: str = "refine"
    # Also copy every checkpoint (weights + optimizer state) into MLflow's artifacts. Off by default: a real run would
    # upload gigabytes per save; the final model is always logged (an MLflow Model, refine_core.serving).
    log_checkpoints: bool = False
    # CPU, memory, disk, network and (with nvidia-ml-py) GPU utilisation and memory as ``system/...`` metrics of every
    # stage run, sampled every ``system_metrics_interval_s`` by MLflow's monitor; needs the ``system-metrics`` extra.
    system_metrics: bool = False
    system_metrics_interval_s: float = 10.0
    tags: dict[str, str] = field(default_factory=dict)
    # A failing or unreachable server never takes a stage down: with ``offline`` the run goes on and its tracking is
    # journaled under ``{output_dir}/tracking-offline/`` (upload: ``refine tracking sync JOURNAL``); ``false``
    # stops the stage in one line instead. HTTP calls give up after ``request_timeout_s`` and ``max_retries``
    # (unless $MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES say otherwise).
    offline: bool = True
    request_timeout_s: float = 10.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.backend not in ("mlflow", "none"):
            raise ConfigError(f"tracking.backend={self.backend!r}; use 'mlflow' or 'none'.")
        if self.system_metrics_interval_s <= 0:
            raise ConfigError(f"tracking.system_metrics_interval_s={self.system_metrics_interval_s} must be > 0.")
