"""The delta rule over whole sequences that also returns the fast-weight state at chosen cut points.

REFINE's ``branch`` engine (spec §2.3) reads each document once and needs, besides the outputs, the state ``S`` after
the first ``r_j`` tokens for M cut points ``r_j`` per document, with gradients flowing back from those states into
the document pass. Two exact ways to get them, both over a whole batch of documents at once:

``segments`` (PyTorch, any device and dtype)
    Split every row at its cuts into M + 1 segments; run segment ``j`` of all rows as one call (right-padded with
    ``beta = k = g = 0``, which leaves the state untouched), carrying each row's state from segment to segment. M + 1
    calls per layer, each of them batched over the documents.

``varlen`` (fla's Triton kernels, CUDA and bf16/fp16)
    All B·(M+1) segments run side by side in ONE varlen call per pass (``cu_seqlens`` on the flattened batch), so
    every kernel sees the same shapes whatever the cuts are (total length B·T and B·(M+1) sequences; the cut positions
    are data). The state is affine in the state a segment starts from: ``S_end = P S_start + Z`` with ``P`` the
    product of the segment's ``(I - beta_t k_t k_t^T)`` (times its decays) and ``Z`` its end state from zero. One pass
    with the values widened to ``[v | 0]`` and the start states ``[0 | I]`` returns ``[Z | P]`` for every segment; a
    chain of M small matrix products then gives every segment's true start state; a second pass from those states
    gives the exact outputs and the states at the cuts. Gradients flow through both passes and the chain (fla's
    kernels give gradients for initial and final states).

Both agree with reading every prefix separately (tested in float64 on CPU; ``varlen`` against ``segments`` in bf16
on the GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from refine_core.models.ops import fla_backend
from refine_core.models.ops.delta_rule import check_delta_rule_inputs, delta_rule

_METHODS = ("auto", "segments", "varlen")

# (q, k, v, beta, g, cu_seqlens, initial_state, cu_seqlens_device=...) -> (o, final_states): a delta rule over packed
# sequences; cu_seqlens on the CPU, cu_seqlens_device the same offsets on q's device (or None)
VarlenDeltaRule = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class CutPlan:
    """What every layer needs to know about one batch's cut points, computed once per model pass.

    Each tensor that lives on the device is copied there once, from pinned memory without waiting: a plain
    ``.to(device)`` of a CPU tensor waits for all queued GPU work (``memcpy_and_sync``), and done per layer (the conv
    caches' gather index, fla's ``cu_seqlens``, the order of the cuts) it drained the GPU's queue some 8 times a
    layer, which left the launch-bound branch step idle for much of its time. Passing the same ``cu_seqlens``
    objects to every layer also lets fla's identity cache (``tensor_cache``) build its chunk index once per pass.
    """

    cuts: torch.Tensor  # [B, M] long, CPU, the caller's order
    length: int  # T
    sorted_cuts: torch.Tensor  # [B, M] long, CPU, ascending per row
    inverse_order: torch.Tensor  # [B, M] long on the device: the caller's order from the sorted one
    device_cuts: torch.Tensor  # [B, M] long on the device, the caller's order
    has_empty: bool  # a repeated cut, or one at 0 or T (an empty segment: no varlen packing)
    cu_seqlens: torch.Tensor  # [B * (M + 1) + 1] long, CPU: the segments packed row after row
    cu_seqlens_device: torch.Tensor  # the same on the device

    @property
    def batch(self) -> int:
        return self.cuts.shape[0]

    @property
    def num_cuts(self) -> int:
        return self.cuts.shape[1]


def to_device_nonblocking(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device`` without making the host wait for queued GPU work (pinned memory, asynchronous copy)."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def plan_cuts(cuts: torch.Tensor, length: int, device: torch.device | str) -> CutPlan:
    """The :class:`CutPlan` of ``cuts`` ``[B, M]`` (positions in ``[0, T]``, any order) for rows of ``length`` tokens.

    Raises:
        ValueError: ``cuts`` is not 2-D or a cut lies outside ``[0, length]``.
    """
    device = torch.device(device)
    cuts = cuts.detach().to("cpu", torch.long)
    if cuts.dim() != 2:
        raise ValueError(f"cuts must be [B, M], got {tuple(cuts.shape)}")
    _check_cuts(cuts, cuts.shape[0], length)
    B = cuts.shape[0]
    sorted_cuts, order = cuts.sort(dim=1)
    bounds = torch.cat([sorted_cuts.new_zeros(B, 1), sorted_cuts, sorted_cuts.new_full((B, 1), length)], 1)
    starts, _ = _segment_bounds(sorted_cuts, length)
    offsets = (torch.arange(B)[:, None] * length + starts).reshape(-1)
    cu_seqlens = torch.cat([offsets, torch.tensor([B * length])])
    return CutPlan(
        cuts=cuts,
        length=length,
        sorted_cuts=sorted_cuts,
        inverse_order=to_device_nonblocking(order.argsort(dim=1), device),
        device_cuts=to_device_nonblocking(cuts, device),
        has_empty=bool((bounds.diff(dim=1) == 0).any()),
        cu_seqlens=cu_seqlens,
        cu_seqlens_device=to_device_nonblocking(cu_seqlens, device),
    )


def _check_cuts(cuts: torch.Tensor, batch: int, length: int) -> None:
    if cuts.dim() != 2 or cuts.shape[0] != batch:
        raise ValueError(f"cuts must be [B={batch}, M], got {tuple(cuts.shape)}")
    if cuts.numel() and (int(cuts.min()) < 0 or int(cuts.max()) > length):
        raise ValueError(f"cuts must lie in [0, T={length}], got values in [{int(cuts.min())}, {int(cuts.max())}]")


def _segment_bounds(cuts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts and ends ``[B, M+1]`` of the segments of every row; ``cuts`` sorted per row."""
    batch = cuts.shape[0]
    zero = cuts.new_zeros(batch, 1)
    end = cuts.new_full((batch, 1), length)
    return torch.cat([zero, cuts], 1), torch.cat([cuts, end], 1)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, t]]`` for ``x`` ``[B, T, ...]`` and ``index`` ``[B, L]``."""
    shape = (*index.shape, *x.shape[2:])
    flat = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, flat)


def _states_by_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    cuts: torch.Tensor,
    initial_state: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``segments`` method on sorted cuts; returns ``(o, final_state, cut_states [B, M, H, K, V])``."""
    B, T = q.shape[:2]
    starts, ends = _segment_bounds(cuts.cpu(), T)
    lengths = ends - starts
    state = initial_state
    outputs, offsets, cut_states, offset = [], [], [], 0
    for j in range(starts.shape[1]):
        width = int(lengths[:, j].max())
        offsets.append(offset)
        if width > 0:
            steps = torch.arange(width)
            index = (starts[:, j, None] + steps).clamp(max=T - 1)
            real = (steps < lengths[:, j, None]).to(q.device)
            index = index.to(q.device)
            seg = {name: _gather_time(x, index) for name, x in (("q", q), ("k", k), ("v", v))}
            keep = real[..., None, None].to(k.dtype)
            seg_beta = _gather_time(beta, index) * real[..., None].to(beta.dtype)
            seg_g = None if g is None else _gather_time(g, index) * real[..., None].to(g.dtype)
            o, state = delta_rule(
                seg["q"], seg["k"] * keep, seg["v"], seg_beta, seg_g,
                initial_state=state, output_final_state=True, **kwargs,
            )
            outputs.append(o)
            offset += width
        elif state is None:
            state_dtype = torch.promote_types(q.dtype, torch.float32)
            state = q.new_zeros(B, q.shape[2], k.shape[3], v.shape[3], dtype=state_dtype)
        if j < starts.shape[1] - 1:
            cut_states.append(state)
    # Row b, time t lives in the output of its segment j at t - start_j; gather it back into time order.
    segment = torch.searchsorted(cuts.cpu().contiguous(), torch.arange(T).expand(B, T).contiguous(), right=True)
    position = torch.tensor(offsets)[segment] + torch.arange(T) - starts.gather(1, segment)
    o = _gather_time(torch.cat(outputs, 1), position.to(q.device))
    return o, state, torch.stack(cut_states, 1)


def _states_by_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    plan: CutPlan,
    initial_state: torch.Tensor | None,
    varlen: VarlenDeltaRule,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``varlen`` method on a plan with no empty segment; see the module docstring for the math."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    M = plan.num_cuts
    # fla reads the lengths on the CPU and the offsets on the device: both come from the plan, the same objects for
    # every layer and both passes
    packing = {"cu_seqlens": plan.cu_seqlens, "cu_seqlens_device": plan.cu_seqlens_device}

    def packed(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.reshape(1, B * T, *x.shape[2:])

    pq, pk, pv, pbeta, pg = packed(q), packed(k), packed(v), packed(beta), packed(g)
    state_dtype = torch.promote_types(q.dtype, torch.float32)
    # Pass 1: every segment from the start state [0 | I], values [v | 0]: its end state is [Z | P].
    eye = torch.eye(K, dtype=state_dtype, device=q.device).expand(B * (M + 1), H, K, K)
    h0 = torch.cat([eye.new_zeros(B * (M + 1), H, K, V), eye], -1)
    wide_v = torch.cat([pv, pv.new_zeros(*pv.shape[:-1], K)], -1)
    _, ends = varlen(pq, pk, wide_v, pbeta, pg, initial_state=h0, **packing)
    ends = ends.view(B, M + 1, H, K, V + K)
    zero_start, transition = ends[..., :V], ends[..., V:]
    # The chain: S_{j+1} = P_j S_j + Z_j, from the row's initial state.
    state = initial_state.to(state_dtype) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=state_dtype)
    segment_starts = [state]
    for j in range(M):
        state = transition[:, j] @ state + zero_start[:, j]
        segment_starts.append(state)
    # Pass 2: every segment from its true start state gives the exact outputs and the states at the cuts.
    o, finals = varlen(pq, pk, pv, pbeta, pg, initial_state=torch.stack(segment_starts, 1).view(-1, H, K, V), **packing)
    finals = finals.view(B, M + 1, H, K, V)
    return o.view(B, T, H, V), finals[:, M], finals[:, :M]


def fla_varlen_delta_rule(scale: float, use_qk_l2norm: bool) -> VarlenDeltaRule:
    """fla's chunked (gated) delta rule over packed sequences, as the ``varlen`` method calls it."""

    def run(q, k, v, beta, g, cu_seqlens, initial_state, cu_seqlens_device=None):
        return fla_backend.fla_delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=True,
            use_qk_l2norm=use_qk_l2norm, recurrent=False, chunk_size=64, cu_seqlens=cu_seqlens,
            cu_seqlens_device=cu_seqlens_device,
        )

    return run


def delta_rule_with_cuts(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    cuts: torch.Tensor | CutPlan,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    method: str = "auto",
    varlen: VarlenDeltaRule | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The delta rule over ``[B, T]`` rows, plus the state after the first ``cuts[b, j]`` tokens of row ``b``.

    Args:
        q, k, v, beta, g, scale, initial_state, use_qk_l2norm: as :func:`refine_core.models.ops.delta_rule`.
        cuts: ``[B, M]`` integer positions in ``[0, T]``, in any order, or their :class:`CutPlan` (made once per
            model pass by :func:`plan_cuts`); state ``j`` of row ``b`` has read tokens ``[0, cuts[b, j])`` of that
            row (pads included: they leave the state untouched).
        method: ``"segments"``, ``"varlen"`` or ``"auto"`` (``varlen`` where fla's kernel would run the chunked
            delta rule for these inputs, ``segments`` otherwise).
        varlen: the packed-sequence delta rule for ``method="varlen"`` (fla's by default; tests pass a PyTorch one).

    Returns:
        ``(o, final_state, cut_states)``: ``o`` ``[B, T, H, V]`` in ``v.dtype``, the state after all ``T`` tokens
        ``[B, H, K, V]`` and ``cut_states`` ``[B, M, H, K, V]``, both float32 (float64 for float64 inputs).
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is not one of {_METHODS}")
    check_delta_rule_inputs(q, k, v, beta, g, initial_state)
    B, T = q.shape[:2]
    if isinstance(cuts, CutPlan):
        if (cuts.batch, cuts.length) != (B, T):
            raise ValueError(f"the cut plan is for [B={cuts.batch}, T={cuts.length}], the inputs are [B={B}, T={T}]")
        plan = cuts
    else:
        _check_cuts(cuts, B, T)
        plan = plan_cuts(cuts, T, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if plan.num_cuts == 0:
        o, final = delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=True,
            use_qk_l2norm=use_qk_l2norm, mode="chunk",
        )
        return o, final, final.new_zeros(B, 0, *final.shape[1:])
    # Empty segments (repeated cuts, a cut at 0 or T) have no place in a packed batch; the segment loop allows them.
    if method == "auto":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, beta, g, initial_state)
        )
        uses_fla = fla_backend.use_fla_delta_rule(
            q, k, v, gated=g is not None, recurrent=False, needs_grad=needs_grad
        )
        method = "varlen" if uses_fla and not plan.has_empty else "segments"
    if method == "varlen":
        if plan.has_empty:
            raise ValueError("method='varlen' needs distinct cuts strictly inside (0, T); use method='segments'")
        o, final, states = _states_by_varlen(
            q, k, v, beta, g, plan, initial_state, varlen or fla_varlen_delta_rule(scale, use_qk_l2norm)
        )
    else:
        o, final, states = _states_by_segments(
            q, k, v, beta, g, plan.sorted_cuts, initial_state, scale=scale, use_qk_l2norm=use_qk_l2norm
        )
    # Back to the caller's order of cuts.
    inverse = plan.inverse_order.to(states.device)
    states = states.gather(1, inverse.view(B, -1, 1, 1, 1).expand_as(states))
    return o, final, states
