"""GPU: the batched branch engine on fla's kernels (bf16) against the PyTorch path (fp32) and the faithful engine.

Run on the GPU device: ``pytest -m gpu -s tests/gpu/test_branch_engine.py``. The heads are 8 x 128 wide, the shape
of the 340M benchmark model, so on a fresh machine these tests and ``bench/bench_gpu.py`` share one Triton autotune.

Tolerances are relative to the reference's largest magnitude, as in ``test_fla_ops.py``: fla keeps bf16
intermediates, so bf16 against fp32 agrees to about 1e-2.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from refine_core.models.ops import delta_rule_with_cuts, fla_available, fla_backend

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if not fla_available():
    pytest.skip("needs fla 0.6.0 and triton (pip install '.[gpu]')", allow_module_level=True)

from refine_core.algorithm.rollout import RolloutSettings, policy_pass, sample_rollouts, score_positions  # noqa: E402
from refine_core.models import DeltaNetConfig, build_model  # noqa: E402
from refine_core.training.refine_step import _ntp_sum_fn  # noqa: E402

DEVICE = "cuda"
B, T, H, K, V = 2, 1500, 8, 128, 128
TOL = 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_varlen_cut_states_match_the_segment_loop_in_fp32():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    inputs = {
        "q": torch.randn(B, T, H, K, device=DEVICE, generator=gen).bfloat16(),
        "k": torch.randn(B, T, H, K, device=DEVICE, generator=gen).bfloat16(),
        "v": torch.randn(B, T, H, V, device=DEVICE, generator=gen).bfloat16(),
        "beta": torch.rand(B, T, H, device=DEVICE, generator=gen).bfloat16(),
    }
    cuts = torch.tensor([[20, 201, 370, 555, 700, 911, 1100, 1479], [64, 128, 129, 700, 701, 1000, 1300, 1480]])
    weights = None
    results = {}
    methods = (("fla varlen", "varlen", lambda x: x), ("torch segments", "segments", torch.Tensor.float))
    for name, method, cast in methods:
        leaves = {n: cast(x).detach().requires_grad_() for n, x in inputs.items()}
        ctx = contextlib.nullcontext() if method == "varlen" else fla_backend.disabled()
        with ctx:
            o, final, states = delta_rule_with_cuts(**leaves, cuts=cuts, use_qk_l2norm=True, method=method)
        if weights is None:
            weights = [torch.randn_like(x.float()) for x in (o, final, states)]
        loss = sum((x.float() * w).sum() for x, w in zip((o, final, states), weights, strict=True))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        grads = {f"d{n}": g for n, g in zip(leaves, grads, strict=True)}
        results[name] = {"o": o, "final": final, "cut states": states, **grads}
    fast, ref = results["fla varlen"], results["torch segments"]
    errors = {key: _rel(fast[key], ref[key]) for key in ref}
    print("\nvarlen (fla bf16) vs segments (torch fp32), max rel err:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < TOL, errors


def test_branch_policy_pass_matches_faithful_in_bf16():
    """Same rollouts through both engines: NTP loss, rollout log-probs and every parameter gradient agree."""
    torch.manual_seed(0)
    config = DeltaNetConfig(hidden_size=1024, num_hidden_layers=2, num_heads=8, vocab_size=32000, eos_token_id=2)
    model = build_model(config).to(DEVICE).train()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 32000, (n,), generator=gen) for n in (1200, 1100)]
    settings = RolloutSettings(rollout_tokens=5, micro_batch_size=2)
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    with amp:
        positions = score_positions(
            model, docs, [0, 1], num_chunks=8, rollout_tokens=5, selection="entropy", entropy_window=5, margin=20,
            seed=0, step=0, pad_id=2, micro_batch_size=2,
        )
        rollouts = sample_rollouts("branch", model, positions, settings, seed=0, step=0, eos_id=2, pad_id=2)
    results = {}
    for engine in ("branch", "faithful"):
        model.zero_grad(set_to_none=True)
        with amp:
            ntp_sum, logp = policy_pass(
                engine, model, positions, [0, 1], rollouts, settings, pad_id=2,
                ntp_labels_fn=_ntp_sum_fn(True, model.lm_head),
            )
        (ntp_sum / 2000 + logp.float().mean()).backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results[engine] = (ntp_sum.detach(), logp.detach(), grads)
    (ntp_b, logp_b, grad_b), (ntp_f, logp_f, grad_f) = results["branch"], results["faithful"]
    errors = {
        "ntp_sum": float((ntp_b - ntp_f).abs() / ntp_f.abs()),
        "logp": _rel(logp_b, logp_f),
        "old_logp": _rel(rollouts.old_logp, logp_f.cpu()),
        "grad": float((grad_b - grad_f).norm() / grad_f.norm()),
    }
    print("\nbranch vs faithful (bf16 autocast), rel err:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert errors["ntp_sum"] < 1e-2 and errors["logp"] < 5e-2 and errors["old_logp"] < 5e-2, errors
    assert errors["grad"] < 5e-2, errors
