"""The NTP trainer end to end on a tiny model: the loss falls, resume is bitwise, the loss is micro-batch invariant."""

from __future__ import annotations

import math
import time

import pytest
import torch
from safetensors.torch import load_file

from refine_core.config import load_config
from refine_core.stages.prepare_data import prepare_data
from refine_core.stages.train_ntp import train_ntp
from refine_core.tracking import MlflowTracker
from refine_core.training.losses import IGNORE_INDEX, ntp_targets
from refine_core.training.optim import build_optimizer, clip_and_step
from refine_core.training.session import DEADLINE_ENV, micro_batch_loss

TINY = [
    "device=cpu",
    "model.arch=delta_net",
    "model.config={hidden_size: 32, num_hidden_layers: 1, num_heads: 2}",
    "data.sources=[{path: synthetic, synthetic_docs: 40, synthetic_words: 60}]",
    "data.min_tokens=96",
    "data.max_tokens=128",
    "data.eval_docs=4",
    "ntp.steps=6",
    "ntp.batch_size=4",
    "ntp.micro_batch_size=2",
    "ntp.lr=3e-3",
    "ntp.eval_every=3",
    "ntp.save_every=2",
    "tracking.backend=none",
]


def tiny_cfg(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path}", *TINY, *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    prepare_data(tiny_cfg(root))
    return root / "data"


def run_cfg(tmp_path, prepared, *extra):
    return tiny_cfg(tmp_path, f"data.prepared_dir={prepared}", *extra)


def test_loss_falls_and_the_model_is_exported(tmp_path, prepared):
    result = train_ntp(run_cfg(tmp_path, prepared, "ntp.steps=12", "ntp.save_every=0"))
    evals = [h["eval/loss"] for h in result.history if "eval/loss" in h]
    assert len(evals) == 5  # steps 0, 3, 6, 9, 12
    assert evals[-1] < evals[0] - 0.5
    assert result.final_eval_loss == evals[-1]
    # the recall probe rides on the same held-out pass: accuracies, paired (same spans, first and repeated)
    probes = [h for h in result.history if "eval/recall_acc" in h]
    assert [h["step"] for h in probes] == [0.0, 3.0, 6.0, 9.0, 12.0]
    assert all(0.0 <= h[k] <= 1.0 for h in probes for k in ("eval/recall_acc", "eval/first_mention_acc"))
    assert probes[-1]["eval/recall_acc"] > probes[0]["eval/recall_acc"]  # the trained model predicts more of them
    assert (result.model_dir / "config.json").is_file() and (result.model_dir / "model.safetensors").is_file()
    assert all(math.isfinite(h["ntp/loss"]) for h in result.history if "ntp/loss" in h)


def test_interrupted_then_resumed_run_is_bitwise_identical(tmp_path, prepared):
    straight = train_ntp(run_cfg(tmp_path / "a", prepared))
    first = train_ntp(run_cfg(tmp_path / "b", prepared, "ntp.stop_after=3"))
    assert first.steps == 3
    resumed = train_ntp(run_cfg(tmp_path / "b", prepared, "ntp.resume=true"))
    assert resumed.steps == 6
    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The logged losses of the resumed steps are the uninterrupted run's, bit for bit.
    tail = [h["ntp/loss"] for h in straight.history if h["step"] > 3 and "ntp/loss" in h]
    assert tail == [h["ntp/loss"] for h in resumed.history if "ntp/loss" in h]


def test_a_past_deadline_checkpoints_after_one_step_and_resume_finishes_bitwise(tmp_path, prepared, monkeypatch):
    straight = train_ntp(run_cfg(tmp_path / "a", prepared))
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() - 1.0))  # a budget that is already spent
    first = train_ntp(run_cfg(tmp_path / "b", prepared))
    assert first.steps == 1 and not first.model_dir.exists()  # stopped early: checkpointed, nothing exported
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() + 3600))  # a budget that is not reached
    resumed = train_ntp(run_cfg(tmp_path / "b", prepared, "ntp.resume=true"))
    assert resumed.steps == 6
    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, prepared):
    result = train_ntp(run_cfg(tmp_path, prepared, "ntp.resume=true", "ntp.steps=2", "ntp.save_every=0"))
    assert result.steps == 2


def test_loss_is_a_token_mean_over_the_whole_batch(tmp_path, prepared):
    """Micro-batch size 1, 2 or 4 gives the same gradients for the same documents, padding included."""
    from refine_core.data.batching import left_pad
    from refine_core.training.losses import count_targets
    from refine_core.training.setup import build_or_load_model, prepared_tokenizer

    cfg = run_cfg(tmp_path, prepared)
    tok = prepared_tokenizer(cfg)
    docs = [list(range(3, 3 + n)) for n in (50, 17, 33, 8)]  # unequal lengths -> padding inside micro-batches
    grads = []
    for micro in (1, 2, 4):
        torch.manual_seed(0)
        model = build_or_load_model(cfg, tok, torch.device("cpu")).double()
        chunks = [left_pad(docs[i : i + micro], tok.pad_token_id) for i in range(0, 4, micro)]
        total = sum(count_targets(ntp_targets(ids, mask)) for ids, mask in chunks)
        for ids, mask in chunks:
            loss_sum, _ = micro_batch_loss(model, ids, mask, mask_pad=True)
            (loss_sum / total).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-10, atol=1e-12)


def test_ntp_targets_mask_padding_or_keep_it_like_the_official_deltanet():
    ids = torch.tensor([[9, 9, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    # Only 5->6 and 6->7 have a real input and a real target.
    assert ntp_targets(ids, mask).tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 6, 7]]
    # spec §10.4: the official DeltaNet loss counts every position, pads included.
    assert ntp_targets(ids, mask, mask_pad=False).tolist() == [[9, 5, 6, 7]]


def test_a_non_finite_gradient_skips_the_step(tmp_path):
    cfg = load_config(None, TINY)
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, cfg.ntp)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    grad_norm, took = clip_and_step(model, optimizer, grad_clip=1.0)
    assert not took and not math.isfinite(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_metrics_reach_mlflow(tmp_path, prepared, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = run_cfg(tmp_path, prepared, "ntp.steps=2", "ntp.save_every=0", "tracking.backend=mlflow")
    with MlflowTracker(experiment="test-ntp", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db") as tracker:
        train_ntp(cfg, tracker)
        run_id = tracker.run_id
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.data.params["ntp.steps"] == "2"
    assert "ntp/loss" in run.data.metrics and "eval/loss" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run_id, "ntp/loss")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "model"} <= artifacts
    assert "checkpoints" not in artifacts  # tracking.log_checkpoints is off by default (gigabytes per save)


def test_a_deadline_that_is_no_time_is_refused_in_one_line(monkeypatch):
    from refine_core.config import ConfigError
    from refine_core.training.session import DEADLINE_ENV, deadline_from_env

    monkeypatch.delenv(DEADLINE_ENV, raising=False)
    assert deadline_from_env() is None
    monkeypatch.setenv(DEADLINE_ENV, "1765170000.5")
    assert deadline_from_env() == 1765170000.5
    monkeypatch.setenv(DEADLINE_ENV, "in ten minutes")
    with pytest.raises(ConfigError, match=r"REFINE_DEADLINE='in ten minutes' is not a time in seconds"):
        deadline_from_env()
