"""States at cut points from one pass (REFINE's branch engine) against reading every prefix on its own, in float64.

The reference is obviously correct: the recurrent delta rule over ``x[:cut]`` alone. Both methods of
:func:`delta_rule_with_cuts` must match it in outputs, states and gradients; the ``varlen`` method (fla's kernels on
the GPU) runs here with a PyTorch packed-sequence delta rule in place of fla's, so its algebra (the ``[v | 0]`` /
``[0 | I]`` pass and the chain of transitions) is checked on every machine.
"""

from __future__ import annotations

import pytest
import torch

from refine_core.models.ops import chunk_delta_rule_torch, delta_rule_with_cuts, recurrent_delta_rule_torch
from refine_core.models.ops.conv import conv_cache_at, short_conv

F64 = torch.float64


def _inputs(B: int, T: int, H: int, K: int, V: int, gated: bool, seed: int = 0) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(B, T, H, K, dtype=F64, generator=gen),
        "k": torch.randn(B, T, H, K, dtype=F64, generator=gen),
        "v": torch.randn(B, T, H, V, dtype=F64, generator=gen),
        "beta": torch.rand(B, T, H, dtype=F64, generator=gen),
        "g": -torch.rand(B, T, H, dtype=F64, generator=gen) if gated else None,
        "initial_state": torch.randn(B, H, K, V, dtype=F64, generator=gen),
    }


def torch_varlen(q, k, v, beta, g, cu_seqlens, initial_state, cu_seqlens_device=None):
    """A packed-sequence delta rule (fla's varlen contract) from the PyTorch chunked op, one sequence at a time."""
    assert cu_seqlens.device.type == "cpu" and torch.equal(cu_seqlens_device.cpu(), cu_seqlens)
    outputs, finals = [], []
    bounds = cu_seqlens.tolist()
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        o, final = chunk_delta_rule_torch(
            q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], beta[:, lo:hi], None if g is None else g[:, lo:hi],
            initial_state=initial_state[n : n + 1], output_final_state=True, use_qk_l2norm=True, chunk_size=16,
        )
        outputs.append(o)
        finals.append(final)
    return torch.cat(outputs, 1), torch.cat(finals)


def _reference(inputs: dict, cuts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs of the whole rows, their final states and, for every cut, the recurrence over that prefix alone."""
    full, final = recurrent_delta_rule_torch(**inputs, output_final_state=True, use_qk_l2norm=True)
    states = []
    for b in range(cuts.shape[0]):
        row = {n: (x[b : b + 1] if n == "initial_state" else x[b : b + 1]) if x is not None else None
               for n, x in inputs.items()}
        for cut in cuts[b].tolist():
            prefix = {n: (x if n == "initial_state" or x is None else x[:, :cut]) for n, x in row.items()}
            _, s = recurrent_delta_rule_torch(**prefix, output_final_state=True, use_qk_l2norm=True)
            states.append(s[0])
    return full, final, torch.stack(states).view(*cuts.shape, *states[0].shape)


def _with_grads(fn, inputs: dict, weights: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], dict]:
    leaves = {n: x.clone().requires_grad_() for n, x in inputs.items() if x is not None}
    outs = fn({**inputs, **leaves})
    loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outs], dict(zip(leaves, grads, strict=True))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("method", ["segments", "varlen"])
def test_states_at_cuts_equal_reading_each_prefix(gated: bool, method: str) -> None:
    B, T, H, K, V = 2, 150, 2, 8, 6
    inputs = _inputs(B, T, H, K, V, gated)
    cuts = torch.tensor([[97, 5, 40, 64, 130], [1, 149, 70, 33, 71]])  # unsorted, near both ends, across chunks
    full, final, states = _reference(inputs, cuts)
    weights = (torch.randn_like(full), torch.randn_like(final), torch.randn_like(states))

    def run(x):
        return delta_rule_with_cuts(**x, cuts=cuts, use_qk_l2norm=True, method=method, varlen=torch_varlen)

    (o, s, at_cuts), grads = _with_grads(run, inputs, weights)
    torch.testing.assert_close(o, full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, final, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(at_cuts, states, rtol=1e-10, atol=1e-10)

    def reference(x):
        return _reference(x, cuts)

    _, ref_grads = _with_grads(reference, inputs, weights)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_repeated_and_boundary_cuts_fall_back_to_segments() -> None:
    inputs = _inputs(2, 40, 2, 4, 4, gated=False)
    cuts = torch.tensor([[0, 12, 12], [40, 3, 39]])
    _, _, states = _reference(inputs, cuts)
    o, _, at_cuts = delta_rule_with_cuts(**inputs, cuts=cuts, use_qk_l2norm=True)
    torch.testing.assert_close(at_cuts, states, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="distinct cuts"):
        delta_rule_with_cuts(**inputs, cuts=cuts, use_qk_l2norm=True, method="varlen", varlen=torch_varlen)
    with pytest.raises(ValueError, match=r"cuts must lie in \[0, T=40\]"):
        delta_rule_with_cuts(**inputs, cuts=cuts + 1, use_qk_l2norm=True)
    with pytest.raises(ValueError, match="cuts must be"):
        delta_rule_with_cuts(**inputs, cuts=cuts[0], use_qk_l2norm=True)


def test_no_cuts_is_the_plain_delta_rule() -> None:
    inputs = _inputs(2, 30, 2, 4, 4, gated=True)
    o, s, at_cuts = delta_rule_with_cuts(**inputs, cuts=torch.zeros(2, 0, dtype=torch.long), use_qk_l2norm=True)
    ref_o, ref_s = recurrent_delta_rule_torch(**inputs, output_final_state=True, use_qk_l2norm=True)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(s, ref_s)
    assert at_cuts.shape == (2, 0, 2, 4, 4)


@pytest.mark.parametrize("with_cache", [False, True])
def test_conv_cache_at_cuts_equals_the_cache_after_each_prefix(with_cache: bool) -> None:
    B, T, D, W = 2, 20, 5, 4
    x = torch.randn(B, T, D, dtype=F64)
    weight = torch.randn(D, 1, W, dtype=F64)
    cache = torch.randn(B, D, W, dtype=F64) if with_cache else None
    cuts = torch.tensor([[0, 2, 19, 20], [7, 3, 3, 1]])
    got = conv_cache_at(x, cache, cuts, W).view(B, 4, D, W)
    for b in range(B):
        for j, cut in enumerate(cuts[b].tolist()):
            row_cache = None if cache is None else cache[b : b + 1]
            if cut == 0:  # nothing read: the cache before x
                expected = row_cache if row_cache is not None else torch.zeros(1, D, W, dtype=F64)
            else:
                _, expected = short_conv(x[b : b + 1, :cut], weight, cache=row_cache, output_final_state=True)
            torch.testing.assert_close(got[b, j], expected[0])


def test_cut_plan_packs_the_segments_and_gives_the_same_states() -> None:
    """One plan per model pass: its packing is every row's segments back to back, and a layer given the plan computes
    what it computes from the raw cuts."""
    from refine_core.models.ops.cut_states import plan_cuts

    inputs = _inputs(B=2, T=40, H=2, K=4, V=4, gated=False)
    cuts = torch.tensor([[30, 5, 17], [1, 39, 20]])
    plan = plan_cuts(cuts, 40, "cpu")
    assert plan.cu_seqlens.tolist() == [0, 5, 17, 30, 40, 41, 60, 79, 80]
    assert torch.equal(plan.cu_seqlens_device, plan.cu_seqlens) and not plan.has_empty
    assert torch.equal(plan.sorted_cuts.gather(1, plan.inverse_order), cuts)
    for method in ("segments", "varlen"):
        kwargs = {"use_qk_l2norm": True, "method": method, "varlen": torch_varlen}
        from_plan = delta_rule_with_cuts(**inputs, cuts=plan, **kwargs)
        from_cuts = delta_rule_with_cuts(**inputs, cuts=cuts, **kwargs)
        for a, b in zip(from_plan, from_cuts, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert plan_cuts(torch.tensor([[0, 3]]), 10, "cpu").has_empty
    with pytest.raises(ValueError, match=r"cut plan is for \[B=2, T=40\]"):
        delta_rule_with_cuts(**_inputs(B=2, T=41, H=2, K=4, V=4, gated=False), cuts=plan)
