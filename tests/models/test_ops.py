"""CPU tests of refine_core.models.ops against the naive references and the defining formulas, in float64."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from refine_core.models.ops import (
    chunk_delta_rule_torch,
    cross_entropy,
    delta_rule,
    fla_backend,
    gated_rms_norm,
    l2_normalize,
    recurrent_delta_rule_torch,
    rms_norm,
    short_conv,
    token_entropy,
)
from refine_core.models.ops.naive import naive_delta_rule, naive_short_conv

F64 = torch.float64
# the package re-exports the function cross_entropy under the submodule's name, so fetch the module itself
cross_entropy_module = importlib.import_module("refine_core.models.ops.cross_entropy")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed 42, and one intra-op thread: these tensors are tiny, and two OpenMP threads on a 2-core box that is
    busy with anything else spin-wait for each other (measured: 27 s for this file instead of 5 s)."""
    torch.manual_seed(42)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _delta_inputs(B: int, T: int, H: int, K: int, V: int, gated: bool, with_state: bool, dtype=F64) -> dict:
    """Random delta-rule inputs in the ranges the models produce: unit keys, beta in (0, 1), g <= 0."""
    return {
        "q": torch.randn(B, T, H, K, dtype=dtype),
        "k": F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1),
        "v": torch.randn(B, T, H, V, dtype=dtype),
        "beta": torch.rand(B, T, H, dtype=dtype),
        "g": F.logsigmoid(torch.randn(B, T, H, dtype=dtype)) if gated else None,
        "initial_state": torch.randn(B, H, K, V, dtype=dtype) if with_state else None,
    }


def _outputs_and_grads(fn, inputs: dict, weights: tuple[torch.Tensor, torch.Tensor]):
    """Run ``fn``, then the gradients of a fixed random weighting of (o, final state) w.r.t. every input."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items() if x is not None}
    args = {name: leaves.get(name) for name in inputs}
    o, state = fn(**args)
    loss = (o * weights[0]).sum() + (state * weights[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), state.detach(), dict(zip(leaves, grads, strict=True))


def _naive(**kw):
    return naive_delta_rule(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("beta"), **kw)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-9) -> None:
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= tol * max(1.0, expected.abs().max().item()), f"{what}: max error {err:.3e}"


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("with_state", [False, True], ids=["h0=0", "h0"])
def test_delta_rule_matches_naive(T: int, gated: bool, with_state: bool) -> None:
    B, H, K, V = 2, 2, 8, 6
    inputs = _delta_inputs(B, T, H, K, V, gated, with_state)
    weights = (torch.randn(B, T, H, V, dtype=F64), torch.randn(B, H, K, V, dtype=F64))
    o_ref, s_ref, g_ref = _outputs_and_grads(_naive, inputs, weights)

    candidates = {
        "recurrent": lambda **kw: recurrent_delta_rule_torch(**kw, output_final_state=True),
        "chunk16": lambda **kw: chunk_delta_rule_torch(**kw, output_final_state=True, chunk_size=16),
        "chunk64": lambda **kw: chunk_delta_rule_torch(**kw, output_final_state=True, chunk_size=64),
    }
    for name, fn in candidates.items():
        o, s, grads = _outputs_and_grads(fn, inputs, weights)
        _assert_close(o, o_ref, f"{name} o")
        _assert_close(s, s_ref, f"{name} final state")
        for leaf, grad in grads.items():
            _assert_close(grad, g_ref[leaf], f"{name} d{leaf}")


def test_strong_decay_is_stable() -> None:
    """Decays of exp(-30) per token underflow any naive exp(-cumsum) form; ours must stay finite and exact."""
    inputs = _delta_inputs(1, 150, 2, 8, 8, gated=True, with_state=True)
    inputs["g"] = -30 * torch.rand(1, 150, 2, dtype=F64)
    weights = (torch.randn(1, 150, 2, 8, dtype=F64), torch.randn(1, 2, 8, 8, dtype=F64))
    o_ref, s_ref, g_ref = _outputs_and_grads(_naive, inputs, weights)
    o, s, grads = _outputs_and_grads(
        lambda **kw: chunk_delta_rule_torch(**kw, output_final_state=True), inputs, weights
    )
    _assert_close(o, o_ref, "o")
    _assert_close(s, s_ref, "state")
    for leaf, grad in grads.items():
        assert torch.isfinite(grad).all(), leaf
        _assert_close(grad, g_ref[leaf], f"d{leaf}")


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_split_sequence_carries_state(gated: bool) -> None:
    inputs = _delta_inputs(2, 150, 2, 8, 6, gated, with_state=True)
    o_full, s_full = chunk_delta_rule_torch(**inputs, output_final_state=True, chunk_size=16)

    def part(sl: slice) -> dict:
        return {n: (x[:, sl] if x is not None and n != "initial_state" else x) for n, x in inputs.items()}

    o1, s1 = chunk_delta_rule_torch(**part(slice(0, 70)), output_final_state=True, chunk_size=16)
    o2, s2 = chunk_delta_rule_torch(**{**part(slice(70, 140)), "initial_state": s1}, output_final_state=True)
    o3, s3 = recurrent_delta_rule_torch(**{**part(slice(140, 150)), "initial_state": s2}, output_final_state=True)
    _assert_close(torch.cat([o1, o2, o3], dim=1), o_full, "o")
    _assert_close(s3, s_full, "state")


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_zero_beta_and_key_positions_leave_state_untouched(gated: bool) -> None:
    """How padding works: positions with beta = 0 and k = 0 (and g = 0) change neither the state nor other outputs."""
    B, T, H, K, V, n_pad = 2, 40, 2, 8, 6, 9
    inputs = _delta_inputs(B, T, H, K, V, gated, with_state=True)
    o_ref, s_ref = naive_delta_rule(**inputs)

    pad_at = torch.zeros(B, T + n_pad, dtype=torch.bool)
    pad_at[0, :n_pad] = True  # left padding
    pad_at[1, torch.randperm(T + n_pad)[:n_pad]] = True  # scattered holes
    real = ~pad_at
    padded = {}
    for name in ("q", "v"):  # arbitrary values at pads: they must not matter
        x = inputs[name]
        padded[name] = torch.randn(B, T + n_pad, *x.shape[2:], dtype=F64)
        padded[name][real] = x.reshape(B * T, *x.shape[2:])
    for name in ("k", "beta", "g"):
        x = inputs[name]
        if x is not None:
            padded[name] = torch.zeros(B, T + n_pad, *x.shape[2:], dtype=F64)
            padded[name][real] = x.reshape(B * T, *x.shape[2:])
    padded.setdefault("g", None)

    for fn in (chunk_delta_rule_torch, recurrent_delta_rule_torch):
        o, s = fn(**padded, initial_state=inputs["initial_state"], output_final_state=True)
        _assert_close(s, s_ref, f"{fn.__name__} state")
        _assert_close(o[real].reshape(B, T, H, V), o_ref, f"{fn.__name__} o")


def test_use_qk_l2norm_equals_normalising_first() -> None:
    inputs = _delta_inputs(2, 80, 2, 8, 6, gated=True, with_state=True)
    inputs["k"] = 3 * torch.randn(2, 80, 2, 8, dtype=F64)
    normalised = {**inputs, "q": l2_normalize(inputs["q"]), "k": l2_normalize(inputs["k"])}
    o_ref, s_ref = naive_delta_rule(**normalised)
    for mode in ("chunk", "recurrent"):
        o, s = delta_rule(**inputs, use_qk_l2norm=True, output_final_state=True, mode=mode)
        _assert_close(o, o_ref, f"{mode} o")
        _assert_close(s, s_ref, f"{mode} state")


def test_delta_rule_dispatch_modes_and_dtypes() -> None:
    inputs = _delta_inputs(1, 30, 2, 8, 6, gated=True, with_state=True)
    o_ref, s_ref = naive_delta_rule(**inputs, scale=0.3)
    for mode in ("auto", "chunk", "recurrent"):
        o, s = delta_rule(**inputs, scale=0.3, output_final_state=True, mode=mode, chunk_size=8)
        _assert_close(o, o_ref, f"{mode} o")
        _assert_close(s, s_ref, f"{mode} state")
    assert delta_rule(**inputs)[1] is None

    # low-precision inputs are computed in float32: o comes back in v's dtype, the state in float32
    low = {n: (x.to(torch.bfloat16) if n != "initial_state" else x.float()) for n, x in inputs.items()}
    o_ref32, s_ref32 = naive_delta_rule(**{n: x.float() for n, x in low.items()})
    o, s = delta_rule(**low, output_final_state=True, mode="chunk")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(o, o_ref32.to(torch.bfloat16))
    torch.testing.assert_close(s, s_ref32, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="mode"):
        delta_rule(**inputs, mode="fused")
    with pytest.raises(ValueError, match="beta"):
        delta_rule(**{**inputs, "beta": inputs["beta"][..., None]})
    with pytest.raises(ValueError, match="key-first"):
        delta_rule(**{**inputs, "initial_state": inputs["initial_state"].transpose(-1, -2)})


def test_hopper_gated_backward_guard() -> None:
    broken = fla_backend.hopper_gated_backward_broken
    assert broken((9, 0), "3.6.0")
    assert broken((9, 0), "3.4.0")
    assert broken((9, 0), "3.7.0+git8f1a2b3")
    assert not broken((9, 0), "3.7.1")
    assert not broken((9, 0), "3.8.0")
    assert not broken((9, 0), "3.3.1")  # older Triton: fla 0.6.0 does not refuse it
    assert not broken((8, 0), "3.6.0")  # A100
    assert not broken((10, 0), "3.6.0")  # Blackwell
    with pytest.raises(ValueError, match="version"):
        broken((9, 0), "nightly")
    q = torch.randn(1, 4, 1, 8, dtype=torch.bfloat16)
    assert not fla_backend.use_fla_delta_rule(q, q, q, gated=True, recurrent=False, needs_grad=True)


def test_ops_import_without_fla_or_triton() -> None:
    code = (
        "import sys, refine_core.models.ops as ops, torch\n"
        "ops.delta_rule(*[torch.randn(1, 3, 1, 4)] * 3, torch.rand(1, 3, 1))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('fla', 'triton')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_short_conv_matches_naive_and_decodes_incrementally(activation: str | None, with_bias: bool) -> None:
    B, T, D, W = 2, 11, 5, 4
    x = torch.randn(B, T, D, dtype=F64)
    weight = torch.randn(D, 1, W, dtype=F64)
    bias = torch.randn(D, dtype=F64) if with_bias else None
    y_ref, cache_ref = naive_short_conv(x, weight, bias, activation, None)

    y, cache = short_conv(x, weight, bias, activation, output_final_state=True)
    _assert_close(y, y_ref, "full y")
    _assert_close(cache, cache_ref, "full cache")
    # the cache is the last W inputs, oldest first
    _assert_close(cache, x[:, -W:].transpose(1, 2), "cache layout")
    # nn.Conv1d(padding=W-1) truncated to the causal part is what fla's ShortConvolution subclasses
    conv = F.conv1d(x.transpose(1, 2), weight, bias, padding=W - 1, groups=D)[..., :T].transpose(1, 2)
    _assert_close(y, F.silu(conv) if activation else conv, "nn.Conv1d")

    for split in (1, 2, 6):  # prefill shorter than, at, and longer than the window, then one token at a time
        y_pre, cache = short_conv(x[:, :split], weight, bias, activation, output_final_state=True)
        steps = [y_pre]
        for t in range(split, T):
            y_t, cache = short_conv(x[:, t : t + 1], weight, bias, activation, cache=cache, output_final_state=True)
            steps.append(y_t)
        _assert_close(torch.cat(steps, dim=1), y_ref, f"prefill {split} + decode y")
        _assert_close(cache, cache_ref, f"prefill {split} + decode cache")

    # a cache continues a sequence in a multi-token call too, and the naive version agrees
    cache0 = torch.randn(B, D, W, dtype=F64)
    y_ref, cache_ref = naive_short_conv(x, weight, bias, activation, cache0)
    y, cache = short_conv(x, weight, bias, activation, cache=cache0, output_final_state=True)
    _assert_close(y, y_ref, "cached y")
    _assert_close(cache, cache_ref, "cached cache")
    assert short_conv(x, weight, bias, activation)[1] is None


def test_short_conv_low_precision_and_errors() -> None:
    x = torch.randn(2, 9, 6, dtype=torch.bfloat16)
    weight = torch.randn(6, 1, 4)
    y, cache = short_conv(x, weight, output_final_state=True)
    y32, _ = short_conv(x.float(), weight)
    assert y.dtype == cache.dtype == torch.bfloat16
    torch.testing.assert_close(y, y32.to(torch.bfloat16))
    with pytest.raises(ValueError, match="activation"):
        short_conv(x, weight, activation="relu")
    with pytest.raises(ValueError, match="weight"):
        short_conv(x, weight[:5])


@pytest.mark.parametrize("T", [2, 11])
@pytest.mark.parametrize("with_cache", [False, True], ids=["fresh", "cache"])
def test_fla_short_conv_glue_builds_the_cache_like_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, T: int, with_cache: bool
) -> None:
    """The fla path takes only ``y`` from fla's kernel and builds the final cache itself (fla 0.6.0's backward drops
    the gradient of the cache's slot 0). A stand-in for the kernel computes ``y`` with the PyTorch path, so this
    checks the glue: the cache and every gradient equal the PyTorch path's, for ``T`` shorter and longer than W."""
    B, D, W = 2, 3, 4

    def fake_causal_conv1d(x, weight, bias, initial_state, output_final_state, activation, backend):
        assert not output_final_state and backend == "triton"
        return short_conv(x, weight[:, None], bias, activation, initial_state)[0], None

    fake = type(sys)("fla.modules.causal_conv1d")
    fake.causal_conv1d = fake_causal_conv1d
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d", fake)
    x = torch.randn(B, T, D, dtype=F64, requires_grad=True)
    weight = torch.randn(D, 1, W, dtype=F64, requires_grad=True)
    cache = torch.randn(B, D, W, dtype=F64, requires_grad=True) if with_cache else None
    leaves = [t for t in (x, weight, cache) if t is not None]
    results = []
    for conv in (fla_backend.fla_short_conv, lambda *a: short_conv(*a)):
        y, new_cache = conv(x, weight, None, "silu", cache, True)
        probe = torch.Generator().manual_seed(0)
        loss = (y * torch.randn(y.shape, generator=probe, dtype=F64)).sum()
        loss = loss + (new_cache * torch.randn(new_cache.shape, generator=probe, dtype=F64)).sum()
        results.append([y, new_cache, *torch.autograd.grad(loss, leaves)])
    for i, (glue, torch_path) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(glue, torch_path, msg=f"tensor {i}")
    assert fla_backend.fla_short_conv(x, weight, None, "silu", cache, False)[1] is None


def test_norms_match_their_formulas() -> None:
    x = torch.randn(3, 7, 16, dtype=F64)
    gate = torch.randn(3, 7, 16, dtype=F64)
    weight = torch.randn(16, dtype=F64)
    eps = 1e-5
    normed = x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight
    _assert_close(rms_norm(x, weight, eps), normed, "rms_norm")
    _assert_close(gated_rms_norm(x, gate, weight, eps), normed * gate * torch.sigmoid(gate), "swish gate")
    _assert_close(gated_rms_norm(x, gate, weight, eps, "silu"), normed * gate * torch.sigmoid(gate), "silu gate")
    _assert_close(gated_rms_norm(x, gate, weight, eps, "sigmoid"), normed * torch.sigmoid(gate), "sigmoid gate")
    _assert_close(l2_normalize(x), x / torch.sqrt((x**2).sum(-1, keepdim=True) + 1e-6), "l2_normalize")
    _assert_close(l2_normalize(x, eps=0.5), x / torch.sqrt((x**2).sum(-1, keepdim=True) + 0.5), "l2 eps")

    # bf16 in, float32 math, bf16 out
    xb, gb, wb = x.to(torch.bfloat16), gate.to(torch.bfloat16), weight.to(torch.bfloat16)
    out = gated_rms_norm(xb, gb, wb, eps)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, gated_rms_norm(xb.float(), gb.float(), wb.float(), eps).to(torch.bfloat16))
    assert rms_norm(xb, wb, eps).dtype == l2_normalize(xb).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="activation"):
        gated_rms_norm(x, gate, weight, eps, activation="relu")


def test_cross_entropy_matches_torch() -> None:
    logits = torch.randn(3, 10, 50, dtype=F64)
    labels = torch.randint(0, 50, (3, 10))
    labels[0, :4] = -100
    labels[2, 7] = -100
    for reduction in ("mean", "sum", "none"):
        expected = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), reduction=reduction)
        _assert_close(cross_entropy(logits, labels, reduction=reduction).reshape(-1), expected.reshape(-1), reduction)
    assert cross_entropy(logits, labels, reduction="none").shape == (3, 10)
    labels[labels == -100] = 7  # any ignore_index works
    labels[1, 1] = 7
    expected = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), ignore_index=7)
    _assert_close(cross_entropy(logits, labels, ignore_index=7), expected, "ignore_index")

    loss = cross_entropy(logits.to(torch.bfloat16), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, F.cross_entropy(logits.to(torch.bfloat16).float().reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    )
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, labels, reduction="avg")


def test_token_entropy_matches_direct_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = 3 * torch.randn(4, 9, 37, dtype=F64)
    p = torch.softmax(logits, dim=-1)
    expected = -(p * torch.log(p)).sum(-1)
    _assert_close(token_entropy(logits), expected, "entropy")
    # force many chunks (5 rows each, the last one partial) to exercise the chunking
    monkeypatch.setattr(cross_entropy_module, "_ENTROPY_CHUNK_ELEMENTS", 5 * 37)
    _assert_close(token_entropy(logits), expected, "chunked entropy")
    uniform = token_entropy(torch.zeros(2, 3, 11, dtype=torch.bfloat16))
    assert uniform.dtype == torch.float32 and uniform.shape == (2, 3)
    torch.testing.assert_close(uniform, torch.full((2, 3), torch.log(torch.tensor(11.0)).item()))
