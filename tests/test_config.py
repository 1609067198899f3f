"""Config loading: YAML + dotted overrides, unknown keys, type errors, invalid values, the repo's configs/ (the
1.3B / 340M ones built on the meta device), and the config fields that reach the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from refine_core.config import (
    ConfigError,
    RunConfig,
    SourceConfig,
    dump_yaml,
    flatten,
    load_config,
    parse_overrides,
    to_dict,
)
from refine_core.models import FastWeightForCausalLM
from refine_core.tokenizer import ByteTokenizer
from refine_core.training.setup import build_or_load_model

REPO = Path(__file__).resolve().parent.parent
REPO_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_without_file() -> None:
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg == RunConfig()
    assert cfg.stage_dir("train-ntp") == Path("runs/default/train-ntp")
    assert cfg.prepared_dir == Path("runs/default/data")


def test_file_then_overrides(tmp_path: Path) -> None:
    tree = {"name": "tiny", "ntp": {"steps": 5, "lr": "3e-4"}, "model": {"config": {"hidden_size": 64}}}
    overrides = ["ntp.steps=7", "model.config.num_heads=2", "tracking.backend=none", "ntp.betas=[0.8, 0.9]"]
    cfg = load_config(write(tmp_path, tree), overrides)
    assert cfg.name == "tiny"
    assert cfg.ntp.steps == 7  # the override wins over the file
    assert cfg.ntp.lr == pytest.approx(3e-4)  # YAML reads "3e-4" as a string; it is coerced
    assert cfg.model.config == {"hidden_size": 64, "num_heads": 2}
    assert cfg.tracking.backend == "none"
    assert cfg.ntp.betas == (0.8, 0.9)


def test_int_to_float_and_integral_float_to_int() -> None:
    cfg = load_config(None, ["ntp.lr=1", "ntp.steps=10.0"])
    assert cfg.ntp.lr == 1.0 and isinstance(cfg.ntp.lr, float)
    assert cfg.ntp.steps == 10 and isinstance(cfg.ntp.steps, int)


def test_unknown_key_names_key_and_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"ntp\.stepz") as info:
        load_config(None, ["ntp.stepz=3"])
    assert "steps" in str(info.value)


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config key.*trainer"):
        load_config(write(tmp_path, {"trainer": {"steps": 1}}))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("ntp.steps=abc", "ntp.steps must be an integer"),
        ("ntp.steps=1.5", "ntp.steps must be an integer"),
        ("ntp.lr=fast", "ntp.lr must be a number"),
        ("ntp.resume=1", "ntp.resume='1'; use true, false or force"),
        ("ntp.betas=[0.9]", "ntp.betas must be a list of 2 values"),
        ("data.sources=foo", "data.sources must be a list"),
        ("model.config=3", "model.config must be a mapping"),
    ],
)
def test_type_errors(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("ntp.batch_size=3", "not a multiple"),
        ("ntp.lr_schedule=step", "lr_schedule"),
        ("ntp.steps=0", "ntp.steps=0 must be >= 1"),
        ("precision=fp16", "precision='fp16'"),
        ("tracking.backend=wandb", "tracking.backend='wandb'"),
        ("model.arch=transformer", "model.arch='transformer'"),
        ("data.max_tokens=10", "data.max_tokens=10 is smaller"),
        ("refine.loss_agg_mode=token_mean", r"refine.loss_agg_mode='token_mean'; use one of token-mean, "),
        ("refine.loss_scale=batch", "refine.loss_scale='batch'; use one of mini_batch, micro_batch"),
        ("refine.singleton_advantage=one", "refine.singleton_advantage='one'"),
        ("refine.clip_ratio_low=1.0", r"refine.clip_ratio_low=1.0 must be in \(0, 1\)"),
        ("refine.clip_ratio_high=0", r"refine.clip_ratio_high=0(.0)? must be in \(0, 1\)"),
        ("refine.clip_eps=1.5", r"refine.clip_eps=1.5 must be in \(0, 1\)"),
        ("refine.dual_clip=0.5", "refine.dual_clip=0.5 must be > 1"),
        ("refine.ppo_micro_batch_size=0", "refine.ppo_micro_batch_size=0 must be >= 1"),
    ],
)
def test_invalid_values(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["ntp.steps"])
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(write(tmp_path, {"name": "x"}), ["name.sub=1"])


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)


def test_list_of_sources(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"data": {"sources": [{"path": "synthetic", "synthetic_docs": 3}, {"path": "corpus/*.jsonl", "max_docs": 10}]}},
    )
    cfg = load_config(path)
    assert cfg.data.sources == [
        SourceConfig(path="synthetic", synthetic_docs=3),
        SourceConfig(path="corpus/*.jsonl", max_docs=10),
    ]
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]"):
        load_config(None, ["data.sources=[{path: a}, {pth: b}]"])


def test_dump_yaml_round_trip_and_flatten(tmp_path: Path) -> None:
    cfg = load_config(None, ["name=rt", "ntp.betas=[0.8, 0.95]", "tracking.tags={team: a}"])
    dump_yaml(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    flat = flatten(to_dict(cfg))
    assert flat["ntp.betas"] == [0.8, 0.95]
    assert flat["tracking.tags.team"] == "a"
    assert flat["model.config"] == {}  # empty sections stay a value


@pytest.mark.parametrize("path", REPO_CONFIGS or [None], ids=lambda p: p.name if p else "none")
def test_repo_configs_load(path: Path | None) -> None:
    if path is None:
        pytest.skip("no configs/*.yaml in the repository yet")
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


# ------------------------------------------------------------------ fields added for the 1.3B / 16K scale


def test_gradient_checkpointing_and_triton_cache_dir_fields() -> None:
    cfg = load_config()
    assert cfg.model.gradient_checkpointing is False and cfg.triton_cache_dir is None
    cfg = load_config(None, ["model.gradient_checkpointing=true", "triton_cache_dir=/mnt/ckpt/triton"])
    assert cfg.model.gradient_checkpointing is True and cfg.triton_cache_dir == "/mnt/ckpt/triton"
    with pytest.raises(ConfigError, match="model.gradient_checkpointing must be true or false"):
        load_config(None, ["model.gradient_checkpointing=1"])


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("s3://bkt/triton", "triton_cache_dir='s3://bkt/triton' is a URI"), ("''", "triton_cache_dir is empty")],
)
def test_bad_triton_cache_dir(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(None, [f"triton_cache_dir={value}"])
    assert "directory" in str(info.value)  # the message says what to put there instead


def _model_for(cfg: RunConfig, tokenizer: ByteTokenizer | None = None) -> FastWeightForCausalLM:
    return build_or_load_model(cfg, tokenizer, torch.device("cpu"))


def test_build_or_load_model_applies_gradient_checkpointing() -> None:
    tiny = ["model.config={hidden_size: 32, num_hidden_layers: 2, num_heads: 2}"]
    torch.manual_seed(0)
    plain = _model_for(load_config(None, tiny), ByteTokenizer())
    torch.manual_seed(0)
    ckpt = _model_for(load_config(None, [*tiny, "model.gradient_checkpointing=true"]), ByteTokenizer())
    assert plain.gradient_checkpointing is False and ckpt.gradient_checkpointing is True
    assert plain.config.vocab_size == ByteTokenizer().vocab_size  # the tokenizer still sizes a fresh model
    # Recomputing the blocks in the backward pass changes neither the loss nor the gradients.
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    for model in (plain, ckpt):
        model.train()
        model(ids).logits.float().logsumexp(-1).mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


# The exact count fla 0.6.0 gives for fla-hub/delta_net-1.3B-100B's config.json on the meta device (models-notes
# §1.3). The 340M one follows from the shapes: 24 x (4·1024² q/k/v/o + 8·1024 beta + 3·4·1024 short convs + 128
# output norm + 2·1024 block norms + 3·2816·1024 MLP) + 2·32000·1024 untied embeddings / LM head + 1024 final norm.
SCALE_CONFIGS = {
    "delta_net-1.3b-16k.yaml": (1_365_677_056, 16384, 5632, True),
    "delta_net-340m-4k.yaml": (
        24 * (4 * 1024**2 + 8 * 1024 + 3 * 4 * 1024 + 128 + 2 * 1024 + 3 * 2816 * 1024) + 2 * 32000 * 1024 + 1024,
        4096,
        2816,
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(SCALE_CONFIGS))
def test_scale_configs_build_on_meta_with_exact_parameter_count(name: str) -> None:
    params, tokens, mlp, checkpointing = SCALE_CONFIGS[name]
    cfg = load_config(REPO / "configs" / name)
    assert cfg.model.source is None and cfg.data.max_tokens == tokens == cfg.data.min_tokens
    assert cfg.precision == "bf16" and cfg.model.gradient_checkpointing is checkpointing
    assert cfg.model.tokenizer == "fla-hub/delta_net-1.3B-100B"
    with torch.device("meta"):  # shapes only: no memory, no tokenizer download (vocab_size is in model.config)
        model = build_or_load_model(cfg, None, torch.device("meta"))
    assert model.num_parameters() == params
    assert model.config.vocab_size == 32000 and model.config.hidden_size // model.config.num_heads == 128
    assert model.config.mlp_intermediate_size == mlp and not model.config.tie_word_embeddings
    assert model.gradient_checkpointing is checkpointing
    # The paper's mid-training recipe (spec §3), with micro-batch 1 at 16K for memory.
    r = cfg.refine
    assert (r.batch_size, r.mini_batch_size, r.num_chunks, r.rollout_tokens, r.rollouts_per_position) == (
        128, 32, 8, 5, 1,
    )
    assert (r.reward, r.lr, r.engine, r.ntp_loss_coef, r.nsp_loss_coef) == ("cosine", 1e-6, "branch", 1.0, 0.2)
    assert r.micro_batch_size == (1 if name.startswith("delta_net-1.3b") else 2)


def test_official_micro_batch_scale_needs_aligned_micro_batches() -> None:
    # 2 documents · 8 chunks · 1 rollout = 16 rollouts per memory micro-batch: official micro-batches of 3 straddle.
    with pytest.raises(ConfigError, match="ppo_micro_batch_size=3; make it a divisor of 16"):
        load_config(None, ["refine.loss_scale=micro_batch", "refine.ppo_micro_batch_size=3"])
    cfg = load_config(None, ["refine.loss_scale=micro_batch", "refine.ppo_micro_batch_size=4"])
    assert cfg.refine.ppo_micro_batch_size == 4
    # Unused (ignored) under the default mini_batch scale.
    assert load_config(None, ["refine.ppo_micro_batch_size=3"]).refine.loss_scale == "mini_batch"


def test_config_modes_match_the_algorithm() -> None:
    from refine_core.algorithm.grpo import LOSS_AGG_MODES
    from refine_core.config import RefineConfig

    for mode in LOSS_AGG_MODES:
        assert RefineConfig(loss_agg_mode=mode).loss_agg_mode == mode


def test_the_lact_760m_config_builds_the_papers_checkpoint_shape() -> None:
    cfg = load_config(REPO / "configs" / "lact-760m-16k.yaml")
    assert cfg.model.arch == "lact_swiglu" and cfg.data.max_tokens == 16384 and cfg.precision == "bf16"
    with torch.device("meta"):
        model = build_or_load_model(cfg, None, torch.device("meta"))
    c = model.config
    # "lact-muon-nope-postnorm-nheads2-chunk2048-760m" (spec §1) on upstream's 760M shape (models-notes §2.3)
    assert (c.use_muon, c.ttt_nope, c.ttt_prenorm, c.num_lact_heads, c.lact_chunk_size) == (True, True, False, 2, 2048)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attn_heads, c.window_size) == (1536, 24, 24, 2048)
    # Upstream's 4-head 760M has 797,625,312 parameters (measured there). Per layer, 2 fast-weight heads of 768
    # instead of 4 of 384 change w1 (2·768² vs 4·384²), lr_proj (3 rates per head: 6 fewer rows of 1536 + bias),
    # ttt_scale_proj and momentum_proj (2 fewer rows of 1536 + bias each) and ttt_norm (768 vs 384); the low-rank
    # w0 / w2 factors keep their size (2·768·32 = 4·384·32).
    per_layer = (2 * 768**2 - 4 * 384**2) - 6 * 1537 - 2 * 1537 - 2 * 1537 + (768 - 384)
    assert model.num_parameters() == 797_625_312 + 24 * per_layer


# The paper's phase settings (spec §3), read back through each stage's --print-config.
PHASE_CONFIGS = {
    "delta_net-1.3b-post-train.yaml": ("post-train", {
        "post.mode": "nested_refine", "post.steps": 24, "post.batch_size": 64, "post.max_prompt_tokens": 4064,
        "refine.mini_batch_size": 16, "refine.reward": "hybrid", "refine.nsp_loss_coef": 0.2, "refine.lr": 1e-6,
    }),
    "delta_net-1.3b-ttt-longbench.yaml": ("ttt", {
        "ttt.mode": "cumulative", "ttt.batch_size": 8, "refine.mini_batch_size": 4, "refine.reward": "exact_match",
        "refine.nsp_loss_coef": 0.4, "eval.max_seq_tokens": 16384,
    }),
    "delta_net-1.3b-eval.yaml": ("evaluate", {"ttt.method": "none", "eval.niah_lengths": [4096, 8192, 16384]}),
}


@pytest.mark.parametrize("name", sorted(PHASE_CONFIGS))
def test_the_paper_phase_configs_resolve_with_the_papers_values(name: str, capsys) -> None:
    import yaml

    from refine_core.cli import main

    stage, expected = PHASE_CONFIGS[name]
    assert main([stage, "--config", str(REPO / "configs" / name), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for dotted, value in expected.items():
        section, key = dotted.split(".")
        assert printed[section][key] == value, dotted
    assert printed["precision"] == "bf16" and printed["model"]["source"]


def test_the_phase_configs_find_the_shared_task_files(monkeypatch) -> None:
    from refine_core.data.tasks import expand_task_files

    shared = REPO.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"{shared} is absent (a clone elsewhere has no shared data)")
    monkeypatch.chdir(REPO)  # the configs name ../shared/data relative to the repository
    ttt = load_config(REPO / "configs" / "delta_net-1.3b-ttt-longbench.yaml")
    assert len(expand_task_files(ttt.eval.task_files)) == 14
    evaluation = load_config(REPO / "configs" / "delta_net-1.3b-eval.yaml")
    assert len(expand_task_files(evaluation.eval.task_files)) == 16
